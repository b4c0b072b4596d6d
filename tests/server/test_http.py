"""The HTTP door and the V2 gRPC service on the embedded model, through the real third-party clients
(huggingface_hub, tritonclient http and grpc) and plain HTTP over a real socket."""

from __future__ import annotations

import asyncio
import json
import shutil
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from huggingface_hub import InferenceClient

from qaserve.config import EMBEDDED_MODEL
from qaserve.server import QAServer

from qaserve_testing import SEED_CONTEXT, SEED_QUESTION, http_request

MODEL = EMBEDDED_MODEL.name
LONG_CONTEXT = " ".join(f"Line {i}: the river number {i} flows into lake {i % 7} near Ålesund." for i in range(40))
# Windows of 64 tokens, four to a forward pass: partial answers before the final one.
LONG_REQUEST = {"context": LONG_CONTEXT, "maxSeqLen": 64, "docStride": 16}


@pytest.fixture(scope="module")
async def served(embedded_server: tuple[QAServer, str, str]) -> tuple[QAServer, str, str]:
    return embedded_server


def assert_paris(answer: Any) -> None:
    assert (answer["answer"], answer["start"], answer["end"]) == ("Paris", 54, 59), answer


async def test_huggingface_hub_inference_client_gets_paris(served: tuple[QAServer, str, str]) -> None:
    _, url, _ = served
    client = InferenceClient(model=url)
    one = await asyncio.to_thread(client.question_answering, question=SEED_QUESTION, context=SEED_CONTEXT)
    assert (one.answer, one.start, one.end) == ("Paris", 54, 59)
    assert 0 < one.score <= 1
    two = await asyncio.to_thread(client.question_answering, question=SEED_QUESTION, context=SEED_CONTEXT, top_k=2)
    assert isinstance(two, list) and len(two) == 2 and two[0].answer == "Paris" and two[0].score >= two[1].score


async def test_task_schema_answers_a_list_of_inputs_each_and_by_model_name(served: tuple[QAServer, str, str]) -> None:
    _, url, _ = served
    item = {"question": SEED_QUESTION, "context": SEED_CONTEXT}
    other = {"question": "Who wrote Hamlet?", "context": "Hamlet was written by William Shakespeare around 1600."}
    many = await http_request(f"{url}/models/{MODEL}", {"inputs": [item, other], "parameters": {"top_k": 1}})
    assert many.status == 200, many.body
    first, second = many.json()
    assert_paris(first)
    assert second["answer"] == other["context"][second["start"] : second["end"]] and "Shakespeare" in second["answer"]
    listed = (await http_request(f"{url}/", {"inputs": [item], "parameters": {"top_k": 3}})).json()
    assert len(listed) == 1 and len(listed[0]) == 3
    assert_paris(listed[0][0])


async def test_qaserve_json_is_the_protobuf_mapping_with_byte_offsets_and_request_id(
    served: tuple[QAServer, str, str],
) -> None:
    _, url, _ = served
    context = "Zoë lives in Zürich, the largest city of Switzerland."
    reply = await http_request(
        f"{url}/v1/answer",
        {"question": "Where does Zoë live?", "context": context, "topK": 1},
        headers={"X-Request-Id": "trace-me-42"},
    )
    assert reply.status == 200, reply.body
    body = reply.json()
    [answer] = body["answers"]
    assert answer["answer"] == context[answer["start"] : answer["end"]] == "Zürich"
    assert context.encode()[answer["byteStart"] : answer["byteEnd"]].decode() == "Zürich"
    assert body["model"]["name"] == MODEL and body["windows"] == 1 and body["timing"]["totalSeconds"] > 0
    assert body["requestId"] == reply.headers["x-request-id"] == "trace-me-42"


async def test_progressive_route_streams_partials_then_the_final_answer(served: tuple[QAServer, str, str]) -> None:
    _, url, _ = served
    request = {**LONG_REQUEST, "question": "Where does river 3 flow?"}
    reply = await http_request(f"{url}/v1/answer:progressive", {"request": request})
    assert reply.status == 200 and reply.headers["content-type"] == "application/x-ndjson", reply.body
    lines = [json.loads(line) for line in reply.body.decode().splitlines()]
    assert len(lines) >= 3 and all("partial" in line for line in lines[:-1]) and "final" in lines[-1]
    done = [line["partial"]["windowsDone"] for line in lines[:-1]]
    assert done == sorted(done) and lines[-2]["partial"]["windowsTotal"] == lines[-1]["final"]["windows"]
    unary = (await http_request(f"{url}/v1/answer", request)).json()
    assert lines[-1]["final"]["answers"] == unary["answers"]


async def test_tritonclient_http_binary_and_json_tensors(served: tuple[QAServer, str, str]) -> None:
    _, url, _ = served

    def run() -> list[Any]:
        client = triton_http.InferenceServerClient(url.removeprefix("http://"))
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
        metadata = client.get_model_metadata(MODEL)
        results = []
        for binary in (True, False):
            inputs = []
            for name, text in (("question", SEED_QUESTION), ("context", SEED_CONTEXT)):
                tensor = triton_http.InferInput(name, [1], "BYTES")
                tensor.set_data_from_numpy(np.array([text.encode()], dtype=object), binary_data=binary)
                inputs.append(tensor)
            outputs = [triton_http.InferRequestedOutput(n, binary_data=binary) for n in ("answer", "start", "end")]
            # The JSON request also names the model's one version (/v2/models/NAME/versions/1/infer).
            version = "" if binary else "1"
            results.append(client.infer(MODEL, inputs, model_version=version, outputs=outputs if not binary else None))
        client.close()
        return [metadata, *results]

    metadata, binary, plain = await asyncio.to_thread(run)
    assert [t["name"] for t in metadata["inputs"]] == ["question", "context"]
    assert [(t["name"], t["datatype"]) for t in metadata["outputs"]] == [
        ("answer", "BYTES"), ("score", "FP32"), ("start", "INT64"), ("end", "INT64"),
    ]  # fmt: skip
    # tritonclient gives BYTES as bytes from binary data, as str from JSON.
    for result, paris in ((binary, b"Paris"), (plain, "Paris")):
        assert result.as_numpy("answer").tolist() == [[paris]]
        assert (result.as_numpy("start")[0, 0], result.as_numpy("end")[0, 0]) == (54, 59)
    assert binary.as_numpy("score").dtype == np.float32 and plain.as_numpy("score") is None


async def test_tritonclient_grpc_on_the_grpc_port(served: tuple[QAServer, str, str]) -> None:
    _, _, target = served

    def run() -> tuple[Any, Any, bool]:
        client = triton_grpc.InferenceServerClient(target)
        inputs = []
        for name, texts in (("question", [SEED_QUESTION, "Where is France?"]), ("context", [SEED_CONTEXT] * 2)):
            tensor = triton_grpc.InferInput(name, [2], "BYTES")
            tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object))
            inputs.append(tensor)
        result = client.infer(MODEL, inputs, parameters={"top_k": 2})
        metadata = client.get_model_metadata(MODEL, as_json=True)
        ready = client.is_server_ready() and client.is_model_ready(MODEL)
        client.close()
        return result, metadata, ready

    result, metadata, ready = await asyncio.to_thread(run)
    assert ready and metadata["platform"] == "qaserve_extractive_qa"
    answers = result.as_numpy("answer")
    assert answers.shape == (2, 2) and answers[0, 0] == b"Paris"
    assert (result.as_numpy("start")[0, 0], result.as_numpy("end")[0, 0]) == (54, 59)
    scores = result.as_numpy("score")
    assert scores.dtype == np.float32 and scores[0, 0] >= scores[0, 1]


async def test_v2_server_metadata_health_and_openapi(served: tuple[QAServer, str, str]) -> None:
    _, url, _ = served
    assert (await http_request(f"{url}/v2")).json()["name"] == "qaserve"
    assert (await http_request(f"{url}/v2/health/live")).status == 200
    assert (await http_request(f"{url}/v2/health/ready")).status == 200
    assert (await http_request(f"{url}/health")).json() == {"status": "SERVING"}
    schema = (await http_request(f"{url}/openapi.json")).json()
    for path in ("/", "/models/{name}", "/v1/answer", "/v1/answer:progressive", "/v2/models/{name}/infer"):
        assert path in schema["paths"], path
    assert schema["components"]["schemas"]["HFRequest"]["properties"]["inputs"]


async def test_model_routes_list_describe_and_load(served: tuple[QAServer, str, str]) -> None:
    _, url, _ = served
    [listed] = (await http_request(f"{url}/v1/models")).json()["models"]
    assert listed["name"] == MODEL and listed["isDefault"] and listed["state"] == "MODEL_STATE_READY"
    assert (await http_request(f"{url}/v1/models/{MODEL}")).json()["model"]["name"] == MODEL
    loaded = await http_request(f"{url}/v1/models/{MODEL}/load", method="POST")
    assert loaded.json()["model"]["state"] == "MODEL_STATE_READY"
    assert (await http_request(f"{url}/v2/models/{MODEL}/ready")).json() == {"name": MODEL, "ready": True}


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("http.Answer", "/v1/answer", {"question": SEED_QUESTION, "context": SEED_CONTEXT}),
        ("http.AnswerProgressive", "/v1/answer:progressive", {"request": {**LONG_REQUEST, "question": "Q?"}}),
    ],
)
async def test_http_calls_are_counted_like_rpcs_streams_once_they_end(
    served: tuple[QAServer, str, str], method: str, path: str, body: dict[str, Any]
) -> None:
    server, url, _ = served
    registry = server.metrics.registry
    labels = {"method": method, "model": MODEL, "code": "OK"}
    before = registry.get_sample_value("qaserve_request_duration_seconds_count", labels) or 0
    seconds = registry.get_sample_value("qaserve_request_duration_seconds_sum", labels) or 0
    reply = await http_request(url + path, body)
    assert reply.status == 200
    assert registry.get_sample_value("qaserve_request_duration_seconds_count", labels) == before + 1
    assert registry.get_sample_value("qaserve_requests_in_flight", {"method": method}) == 0
    final = json.loads(reply.body.decode().splitlines()[-1])
    timing = final.get("final", final)["timing"]
    # The call is measured from its request to its last line: at least the engine's time on the whole request.
    assert registry.get_sample_value("qaserve_request_duration_seconds_sum", labels) - seconds >= timing["totalSeconds"]


async def test_the_v2_service_is_listed_by_reflection(served: tuple[QAServer, str, str]) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    _, _, target = served
    async with grpc.aio.insecure_channel(target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        async for reply in stub.ServerReflectionInfo(iter([request])):
            names = [s.name for s in reply.list_services_response.service]
            break
    assert "inference.GRPCInferenceService" in names


CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")


async def test_the_page_highlights_paris_in_headless_chromium(served: tuple[QAServer, str, str]) -> None:
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.fail("Debian's chromium and chromium-driver are missing: run `make browser`")
    _, url, _ = served
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    def type_submit_and_read() -> tuple[str, str, list[str]]:
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
            options.add_argument(argument)
        driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
        try:
            driver.get(f"{url}/")
            driver.find_element(By.ID, "question").send_keys(SEED_QUESTION)
            driver.find_element(By.ID, "context").send_keys(SEED_CONTEXT)
            driver.find_element(By.ID, "submit").click()
            best = WebDriverWait(driver, 30).until(
                expected_conditions.presence_of_element_located((By.CSS_SELECTOR, "#text mark.best"))
            )
            text = driver.find_element(By.ID, "text").text
            items = [item.text for item in driver.find_elements(By.CSS_SELECTOR, "#answers li")]
            return best.text, text, items
        finally:
            driver.quit()

    best, text, items = await asyncio.to_thread(type_submit_and_read)
    assert best == "Paris"
    assert text == SEED_CONTEXT  # the whole text, answers marked within it
    assert len(items) == 3 and items[0].startswith("Paris: score") and "characters 54 to 59" in items[0]


async def test_read_route_answers_over_passages_in_the_protobuf_mapping(served: tuple[QAServer, str, str]) -> None:
    _, url, _ = served
    passages = [{"text": "Hamlet was written by William Shakespeare.", "id": "p0"}, {"text": SEED_CONTEXT, "id": "p1"}]
    reply = await http_request(f"{url}/v1/read", {"question": SEED_QUESTION, "passages": passages, "topK": 1})
    assert reply.status == 200, reply.body
    [best] = reply.json()["answers"]
    assert (best["answer"], best["passageId"], best["start"], best["end"]) == ("Paris", "p1", 54, 59)
    assert reply.json()["requestId"] == reply.headers["x-request-id"]
    bad = await http_request(f"{url}/v1/read", {"question": SEED_QUESTION, "passages": "p1"})
    assert bad.status == 400 and bad.json()["error"]["field"] == "passages", bad.body
