// A small Node.js client of qaserve.v1: @grpc/grpc-js stubs built at run time from protos/ by @grpc/proto-loader,
// google.rpc.Status error details decoded from the `grpc-status-details-bin` trailer, and answer slicing by the
// offsets JavaScript can use.
import path from "node:path";
import { fileURLToPath } from "node:url";

import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";
import { getProtoPath } from "google-proto-files";
import protobuf from "protobufjs";

const HERE = path.dirname(fileURLToPath(import.meta.url));
/** The repository's protos/ directory: the contract, loaded as is (nothing is generated). */
export const PROTOS_DIR = path.resolve(HERE, "..", "..", "protos");
/** Where google/rpc/*.proto come from (the googleapis protos on npm). */
export const GOOGLEAPIS_DIR = path.dirname(getProtoPath());

const LOADER_OPTIONS = {
  keepCase: true, // field names as in the .proto (snake_case), like every other client
  longs: String,
  enums: String,
  defaults: true, // zero-valued fields (an offset of 0) are present on responses
  oneofs: true, // `update` / `result` name the set member of a oneof
  includeDirs: [PROTOS_DIR, GOOGLEAPIS_DIR],
};

const definition = protoLoader.loadSync(
  ["qaserve/v1/question_answering.proto", "qaserve/v1/model_service.proto"],
  LOADER_OPTIONS,
);
const qaserve = grpc.loadPackageDefinition(definition).qaserve.v1;

// google.rpc.Status and its standard details, for decoding error trailers and AnswerMany item errors.
const rpcTypes = protobuf.loadSync([
  path.join(GOOGLEAPIS_DIR, "google/rpc/status.proto"),
  path.join(GOOGLEAPIS_DIR, "google/rpc/error_details.proto"),
]);
const StatusType = rpcTypes.lookupType("google.rpc.Status");
const DETAIL_TYPES = {
  "google.rpc.BadRequest": "badRequest",
  "google.rpc.ErrorInfo": "errorInfo",
  "google.rpc.RetryInfo": "retryInfo",
};

/** gRPC status codes by number, as names ("INVALID_ARGUMENT"). */
export const CODE_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([name, code]) => [code, name]));

/**
 * A google.rpc.Status (from a trailer, or an AnswerManyResponse's `error`) as
 * {code, codeName, message, errorInfo, badRequest, retryInfo}; unknown detail types are skipped.
 */
export function decodeStatus(status) {
  const decoded = { code: status.code, codeName: CODE_NAMES[status.code], message: status.message };
  for (const any of status.details ?? []) {
    const typeName = (any.type_url ?? any.typeUrl).split("/").pop();
    if (typeName in DETAIL_TYPES) {
      const type = rpcTypes.lookupType(typeName);
      decoded[DETAIL_TYPES[typeName]] = type.toObject(type.decode(any.value), { longs: Number, defaults: true });
    }
  }
  return decoded;
}

/** An RPC that failed: the gRPC code and message plus qaserve's error details. */
export class QAServeError extends Error {
  constructor(serviceError) {
    super(serviceError.details || serviceError.message);
    this.name = "QAServeError";
    this.code = serviceError.code;
    this.codeName = CODE_NAMES[serviceError.code];
    this.reason = "";
    this.fieldViolations = [];
    this.retryAfterMs = null;
    const [bin] = serviceError.metadata?.get("grpc-status-details-bin") ?? [];
    if (bin) {
      const status = decodeStatus(StatusType.toObject(StatusType.decode(bin), { defaults: true }));
      this.reason = status.errorInfo?.reason ?? "";
      this.fieldViolations = (status.badRequest?.fieldViolations ?? []).map((v) => v.field);
      const delay = status.retryInfo?.retryDelay;
      if (delay) this.retryAfterMs = Number(delay.seconds ?? 0) * 1000 + (delay.nanos ?? 0) / 1e6;
    }
  }
}

/**
 * The answer's text, sliced the way JavaScript must: by the UTF-8 byte offsets of a Buffer. String indices in
 * JavaScript are UTF-16 code units and equal neither `start`/`end` (code points) nor the byte offsets once a context
 * holds a character outside the Basic Multilingual Plane.
 */
export function answerText(context, answer) {
  return Buffer.from(context, "utf8").subarray(answer.byte_start, answer.byte_end).toString("utf8");
}

/** The same text by the code point offsets `start`/`end`: Array.from() iterates code points, not UTF-16 units. */
export function answerTextByCodePoints(context, answer) {
  return Array.from(context).slice(answer.start, answer.end).join("");
}

/** QuestionAnsweringService and ModelService over one channel; every call has a deadline. */
export class QAServeClient {
  constructor(target, { credentials = grpc.credentials.createInsecure(), timeoutMs = 10_000 } = {}) {
    this.timeoutMs = timeoutMs;
    this.qa = new qaserve.QuestionAnsweringService(target, credentials);
    this.models = new qaserve.ModelService(target, credentials, { channelOverride: this.qa.getChannel() });
  }

  deadline(timeoutMs) {
    return new Date(Date.now() + (timeoutMs ?? this.timeoutMs));
  }

  /** Answer: resolves to an AnswerResponse, rejects with QAServeError. */
  answer(request, { timeoutMs } = {}) {
    return unary(this.qa, "Answer", request, this.deadline(timeoutMs));
  }

  /** AnswerProgressive: yields {partial} messages, then one {final}. Breaking out of the loop cancels the call. */
  async *answerProgressive(request, { timeoutMs } = {}) {
    const call = this.qa.AnswerProgressive({ request }, { deadline: this.deadline(timeoutMs) });
    try {
      for await (const message of call) yield message;
    } catch (error) {
      throw error.code === undefined ? error : new QAServeError(error);
    } finally {
      call.cancel();
    }
  }

  /**
   * AnswerMany over one bidi stream: sends every {id, request} item, yields each AnswerManyResponse as it arrives
   * (in no guaranteed order). Items that fail carry a google.rpc.Status in `error`; decodeStatus() reads it.
   */
  async *answerMany(items, { timeoutMs } = {}) {
    const call = this.qa.AnswerMany({ deadline: this.deadline(timeoutMs) });
    // Respect HTTP/2 flow control: wait for 'drain' when write() says the buffer is full.
    const writing = (async () => {
      for (const item of items) {
        if (!call.write(item)) await new Promise((resolve) => call.once("drain", resolve));
      }
      call.end();
    })();
    try {
      for await (const response of call) yield response;
      await writing;
    } catch (error) {
      throw error.code === undefined ? error : new QAServeError(error);
    } finally {
      call.cancel();
    }
  }

  /** ModelService.ListModels: the configured models, the default first. */
  async listModels({ timeoutMs } = {}) {
    return (await unary(this.models, "ListModels", {}, this.deadline(timeoutMs))).models;
  }

  close() {
    this.qa.close();
  }
}

function unary(client, method, request, deadline) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline }, (error, response) =>
      error ? reject(new QAServeError(error)) : resolve(response),
    );
  });
}
