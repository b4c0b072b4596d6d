// The Node.js client against a real server: QASERVE_TARGET=host:port of a qaserve serving the embedded model,
// `node --test test/` (tests/clients/test_node.py starts one and runs this).
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { answerText, answerTextByCodePoints, decodeStatus, QAServeClient, QAServeError } from "@qaserve/client";
import { ReflectionClient } from "@qaserve/client/reflection";

const TARGET = process.env.QASERVE_TARGET;
if (!TARGET) throw new Error("set QASERVE_TARGET=host:port of a running qaserve");

const CONTEXT = "France is a country in Western Europe. Its capital is Paris.";
// Code points, UTF-16 code units and UTF-8 bytes all differ here: the rocket and the flag lie outside the Basic
// Multilingual Plane (2 UTF-16 units, 4 bytes per code point), the accented letters take 2 bytes each.
const UNICODE_CONTEXT =
  "🚀 Zoë's café in Zürich 🇨🇭 opened in 1998. Its crème brûlée costs 12 francs 🍮, and the chef is José Núñez.";
// Hundreds of windows at max_seq_len 64: many forward passes, so progress shows before the end.
const LONG_CONTEXT = Array.from(
  { length: 200 },
  (_, i) => `Line ${i}: the river number ${i} flows into lake ${i % 7} near the town of Ålesund.`,
).join(" ");

// A question asked for the first time: the server answers a repeated request from its response cache, in one
// message and without running the model.
const freshQuestion = (question) => `${question} (asked at ${process.hrtime.bigint()})`;

let client;
let MODEL; // the server's default model, listed first
before(async () => {
  client = new QAServeClient(TARGET, { timeoutMs: 30_000 });
  [{ name: MODEL }] = await client.listModels();
});
after(() => client.close());

// What differs between two calls for the same request: the server's timings and each call's request id.
function withoutTiming(response) {
  const { timing: _timing, request_id: _requestId, ...rest } = response;
  return rest;
}

describe("Answer (unary)", () => {
  test("the seed question: Paris, code points 54-59", async () => {
    const { answers } = await client.answer({ question: "What is the capital of France?", context: CONTEXT });
    assert.deepEqual([answers[0].answer, answers[0].start, answers[0].end], ["Paris", 54, 59]);
  });

  test("answers with spans that are slices of the context, and names the model", async () => {
    const response = await client.answer({ question: "What is the capital of France?", context: CONTEXT, top_k: 3 });
    assert.ok(response.answers.length >= 1 && response.answers.length <= 3);
    for (const a of response.answers) {
      assert.equal(a.answer, CONTEXT.slice(a.start, a.end)); // ASCII: every kind of offset agrees
      assert.deepEqual([a.byte_start, a.byte_end], [a.start, a.end]);
      assert.ok(a.score > 0 && a.score <= 1);
    }
    assert.equal(response.model.name, MODEL);
    assert.match(response.model.revision, /^sha256:[0-9a-f]{64}$/);
    assert.equal(response.windows, 1);
    assert.ok(response.timing.total_seconds >= response.timing.forward_seconds);
    assert.match(response.request_id, /^[0-9a-f]{32}$/); // made by the server: this client sent none
  });

  test("a deadline that passes fails the call with DEADLINE_EXCEEDED", async () => {
    const request = { question: freshQuestion("Which lake?"), context: LONG_CONTEXT, max_seq_len: 64, doc_stride: 16 };
    await assert.rejects(client.answer(request, { timeoutMs: 1 }), (error) => {
      assert.ok(error instanceof QAServeError);
      assert.equal(error.codeName, "DEADLINE_EXCEEDED");
      return true;
    });
  });

  test("non-ASCII context: byte offsets on a Buffer, or code points via Array.from, give the answer; UTF-16 indices do not", async () => {
    const response = await client.answer({ question: "Who is the chef?", context: UNICODE_CONTEXT, top_k: 10 });
    assert.ok(response.answers.length >= 2);
    let differing = 0;
    for (const a of response.answers) {
      // The two documented ways to slice in JavaScript.
      assert.equal(answerText(UNICODE_CONTEXT, a), a.answer);
      assert.equal(answerTextByCodePoints(UNICODE_CONTEXT, a), a.answer);
      // Where the answer starts in JavaScript's own (UTF-16) indexing.
      const utf16Start = Array.from(UNICODE_CONTEXT).slice(0, a.start).join("").length;
      assert.equal(UNICODE_CONTEXT.slice(utf16Start, utf16Start + a.answer.length), a.answer);
      if (a.start > 0) {
        // After the rocket every kind of offset differs, and using either pair as string indices is wrong.
        assert.notEqual(utf16Start, a.start);
        assert.notEqual(a.byte_start, a.start);
        assert.notEqual(UNICODE_CONTEXT.slice(a.start, a.end), a.answer);
        assert.notEqual(UNICODE_CONTEXT.slice(a.byte_start, a.byte_end), a.answer);
        differing += 1;
      }
    }
    assert.ok(differing >= 1, "at least one answer must lie past the first non-BMP character");
  });

  test("INVALID_ARGUMENT carries a BadRequest naming the field and an ErrorInfo reason", async () => {
    await assert.rejects(client.answer({ question: "   ", context: CONTEXT }), (error) => {
      assert.ok(error instanceof QAServeError);
      assert.equal(error.codeName, "INVALID_ARGUMENT");
      assert.equal(error.reason, "INVALID_ARGUMENT");
      assert.deepEqual(error.fieldViolations, ["question"]);
      return true;
    });
    await assert.rejects(client.answer({ question: "Capital?", context: CONTEXT, top_k: 21 }), (error) => {
      assert.deepEqual([error.codeName, error.fieldViolations], ["INVALID_ARGUMENT", ["top_k"]]);
      return true;
    });
  });

  test("paths and hub ids are not model names: NOT_FOUND with reason MODEL_NOT_FOUND", async () => {
    for (const model of ["/etc/passwd", "../models/minilm-l6-squadshifts", "deepset/roberta-base-squad2"]) {
      await assert.rejects(client.answer({ question: "Capital?", context: CONTEXT, model }), (error) => {
        assert.deepEqual([error.codeName, error.reason], ["NOT_FOUND", "MODEL_NOT_FOUND"]);
        return true;
      });
    }
  });
});

describe("AnswerProgressive (server streaming)", () => {
  test("partials with growing windows_done, then a final equal to Answer's response", async () => {
    const request = {
      question: freshQuestion("Which lake does river 42 flow into?"),
      context: LONG_CONTEXT,
      top_k: 5,
      max_seq_len: 64,
      doc_stride: 16,
    };
    const messages = [];
    for await (const message of client.answerProgressive(request)) messages.push(message);
    const unary = await client.answer(request);

    const final = messages.pop();
    assert.equal(final.update, "final");
    assert.deepEqual(withoutTiming(final.final), withoutTiming(unary));
    assert.ok(unary.windows > 100);
    assert.ok(messages.length >= 1, "a long context reports progress before the final message");
    let previous = 0;
    for (const message of messages) {
      assert.equal(message.update, "partial");
      assert.ok(message.partial.windows_done > previous);
      assert.equal(message.partial.windows_total, unary.windows);
      for (const a of message.partial.answers) assert.equal(answerText(LONG_CONTEXT, a), a.answer);
      previous = message.partial.windows_done;
    }
    assert.ok(previous < unary.windows);
  });

  test("a one-window context sends only the final message", async () => {
    const messages = [];
    for await (const message of client.answerProgressive({ question: "Capital?", context: CONTEXT })) {
      messages.push(message.update);
    }
    assert.deepEqual(messages, ["final"]);
  });
});

describe("AnswerMany (bidi streaming)", () => {
  test("every item is answered under its id; a bad item gets its own google.rpc.Status", async () => {
    const contexts = [CONTEXT, UNICODE_CONTEXT, LONG_CONTEXT.slice(0, 800)];
    const items = Array.from({ length: 60 }, (_, i) => ({
      id: `q${i}`,
      request: { question: `What is item ${i}?`, context: contexts[i % contexts.length], top_k: 2 },
    }));
    items[17] = { id: "bad", request: { question: "", context: CONTEXT } };
    items[33] = { id: "no-such-model", request: { question: "Capital?", context: CONTEXT, model: "nope" } };
    const byId = new Map();
    for await (const response of client.answerMany(items)) byId.set(response.id, response);

    assert.deepEqual([...byId.keys()].sort(), items.map((item) => item.id).sort());
    const bad = decodeStatus(byId.get("bad").error);
    assert.equal(byId.get("bad").result, "error");
    assert.equal(bad.codeName, "INVALID_ARGUMENT");
    assert.deepEqual(
      bad.badRequest.fieldViolations.map((v) => v.field),
      ["question"],
    );
    assert.equal(decodeStatus(byId.get("no-such-model").error).errorInfo.reason, "MODEL_NOT_FOUND");
    for (const item of items.filter((i) => i.id !== "bad" && i.id !== "no-such-model")) {
      const response = byId.get(item.id);
      assert.equal(response.result, "response", `item ${item.id}`);
      for (const a of response.response.answers) assert.equal(answerText(item.request.context, a), a.answer);
    }
  });
});

describe("ModelService", () => {
  test("lists the default model first, ready", async () => {
    const [first] = await client.listModels();
    assert.deepEqual([first.name, first.is_default, first.state], [MODEL, true, "MODEL_STATE_READY"]);
  });
});

describe("server reflection (for tools without the protos)", () => {
  let reflection;
  before(() => {
    reflection = new ReflectionClient(TARGET);
  });
  after(() => reflection.close());

  test("lists the services", async () => {
    const services = await reflection.listServices();
    for (const name of [
      "qaserve.v1.QuestionAnsweringService",
      "qaserve.v1.ModelService",
      "grpc.health.v1.Health",
      "grpc.reflection.v1alpha.ServerReflection",
    ]) {
      assert.ok(services.includes(name), `${name} in ${services}`);
    }
  });

  test("describes AnswerRequest, and the reflected types alone can call Answer", async () => {
    const root = await reflection.rootFor("qaserve.v1.AnswerRequest");
    const AnswerRequest = root.lookupType("qaserve.v1.AnswerRequest");
    const fields = Object.fromEntries(AnswerRequest.fieldsArray.map((f) => [f.name, [f.id, f.type]]));
    assert.deepEqual(fields, {
      question: [1, "string"],
      context: [2, "string"],
      model: [3, "string"],
      top_k: [4, "int32"],
      max_answer_len: [5, "int32"],
      max_seq_len: [6, "int32"],
      doc_stride: [7, "int32"],
      max_question_len: [8, "int32"],
      handle_impossible_answer: [9, "bool"],
      align_to_words: [10, "bool"],
    });
    // proto3 `optional` shows as a synthetic oneof per field: presence, so "unset" differs from 0.
    const synthetic = AnswerRequest.oneofsArray.map((o) => o.name).sort();
    assert.deepEqual(synthetic, ["_align_to_words", "_doc_stride", "_max_answer_len", "_max_question_len", "_max_seq_len", "_top_k"]);

    const service = root.lookupService("qaserve.v1.QuestionAnsweringService");
    const method = service.methods.Answer.resolve();
    const AnswerResponse = method.resolvedResponseType;
    const request = { question: "What is the capital of France?", context: CONTEXT, top_k: 2 };
    const response = await new Promise((resolve, reject) =>
      reflection.client.makeUnaryRequest(
        `/${service.fullName.slice(1)}/Answer`,
        (message) => Buffer.from(AnswerRequest.encode(AnswerRequest.fromObject(message)).finish()),
        (bytes) => AnswerResponse.toObject(AnswerResponse.decode(bytes), { defaults: true }),
        request,
        { deadline: new Date(Date.now() + 10_000) },
        (error, reply) => (error ? reject(error) : resolve(reply)),
      ),
    );
    const typed = await client.answer(request);
    assert.deepEqual(
      response.answers.map((a) => [a.answer, a.start, a.end]),
      typed.answers.map((a) => [a.answer, a.start, a.end]),
    );
    assert.equal(response.model.name, MODEL);
  });
});
