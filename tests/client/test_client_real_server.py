"""The client against a real qaserve (the tiny model): request ids on every result and error, options as sent."""

from __future__ import annotations

import re

import grpc
import pytest

from qaserve_client import AnswerOptions, AsyncQAClient, ManyItem, QAServeError
from qaserve_client.v1 import model_service_pb2, model_service_pb2_grpc

from qaserve_testing import SEED_CONTEXT, SEED_QUESTION

LONG_CONTEXT = " ".join(f"River {i} flows into lake {i % 7}." for i in range(60))


async def test_request_id_round_trip_on_every_rpc(tiny_server: tuple[object, str]) -> None:
    target = tiny_server[1]
    options = AnswerOptions(top_k=2, max_seq_len=32, doc_stride=8)
    async with AsyncQAClient(target, timeout=30) as client:
        answer = await client.answer(SEED_QUESTION, SEED_CONTEXT, metadata=[("x-request-id", "rt-answer")])
        updates = [
            u
            async for u in client.answer_progressive(
                "Which lake?", LONG_CONTEXT, options, metadata=[("x-request-id", "rt-progressive")]
            )
        ]
        items = [ManyItem("ok", SEED_QUESTION, SEED_CONTEXT), ManyItem("bad", " ", SEED_CONTEXT)]
        many = {r.id: r async for r in client.answer_many(items, metadata=[("x-request-id", "rt-many")])}
        with pytest.raises(QAServeError) as not_found:
            await client.answer(SEED_QUESTION, SEED_CONTEXT, model="nope", metadata=[("x-request-id", "rt-404")])
        made = await client.answer(SEED_QUESTION, SEED_CONTEXT)

    assert answer.request_id == "rt-answer"
    # Every message of the stream, partials (if the windows were scored in several groups) and the final.
    assert {u.request_id for u in updates} == {"rt-progressive"}
    assert many["ok"].request_id == many["ok"].result.request_id == "rt-many"  # type: ignore[union-attr]
    assert many["bad"].error is not None
    assert (many["bad"].error.code, many["bad"].error.request_id) == (grpc.StatusCode.INVALID_ARGUMENT, "rt-many")
    assert (not_found.value.code, not_found.value.request_id) == (grpc.StatusCode.NOT_FOUND, "rt-404")
    assert re.fullmatch("[0-9a-f]{32}", made.request_id)
    # The repeat is answered from the server's response cache, and says so.
    assert answer.timing.cached is False
    assert made.timing.cached is True
    assert made.answers == answer.answers


async def test_model_service_responses_carry_the_request_id(tiny_server: tuple[object, str]) -> None:
    async with grpc.aio.insecure_channel(tiny_server[1]) as channel:
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        listed = await stub.ListModels(model_service_pb2.ListModelsRequest(), metadata=(("x-request-id", "m-1"),))
        got = await stub.GetModel(model_service_pb2.GetModelRequest(), timeout=10)

    assert listed.request_id == "m-1"
    assert re.fullmatch("[0-9a-f]{32}", got.request_id)
