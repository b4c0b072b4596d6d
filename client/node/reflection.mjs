// What a tool without qaserve's protos can do: speak grpc.reflection.v1alpha.ServerReflection (its proto as shipped
// in @grpc/reflection), list the services, fetch the file descriptors of a symbol and build message types from them.
import { createRequire } from "node:module";
import path from "node:path";

import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";
import protobuf from "protobufjs";

const require = createRequire(import.meta.url);
// Adds Root.fromDescriptor and google.protobuf.FileDescriptorProto to protobufjs.
const descriptor = require("protobufjs/ext/descriptor");

const REFLECTION_PROTO = path.join(
  path.dirname(require.resolve("@grpc/reflection/package.json")),
  "build/proto/grpc/reflection/v1alpha/reflection.proto",
);
const definition = protoLoader.loadSync(REFLECTION_PROTO, { keepCase: true, longs: String, defaults: true, oneofs: true });
const { ServerReflection } = grpc.loadPackageDefinition(definition).grpc.reflection.v1alpha;

/** One ServerReflectionInfo stream; each ask() sends a request and resolves to its response. */
export class ReflectionClient {
  constructor(target, { credentials = grpc.credentials.createInsecure(), timeoutMs = 10_000 } = {}) {
    this.client = new ServerReflection(target, credentials);
    this.call = this.client.ServerReflectionInfo({ deadline: new Date(Date.now() + timeoutMs) });
    this.waiting = [];
    this.call.on("data", (response) => this.waiting.shift()?.resolve(response));
    this.call.on("error", (error) => {
      for (const waiter of this.waiting.splice(0)) waiter.reject(error);
    });
  }

  ask(request) {
    return new Promise((resolve, reject) => {
      this.waiting.push({ resolve, reject });
      this.call.write(request);
    });
  }

  /** The fully qualified names of every service the server exposes through reflection. */
  async listServices() {
    const response = await this.ask({ list_services: "" });
    failOn(response);
    return response.list_services_response.service.map((s) => s.name);
  }

  /** FileDescriptorProtos (decoded) of the file defining `symbol` and, transitively, the files it imports. */
  async filesFor(symbol) {
    const files = new Map();
    const add = (response) => {
      failOn(response);
      for (const bytes of response.file_descriptor_response.file_descriptor_proto) {
        const file = descriptor.FileDescriptorProto.decode(bytes);
        files.set(file.name, file);
      }
    };
    add(await this.ask({ file_containing_symbol: symbol }));
    // Servers may send a file alone; fetch the imports they left out.
    for (let missing = dependencies(files); missing.length; missing = dependencies(files)) {
      for (const name of missing) add(await this.ask({ file_by_filename: name }));
    }
    return [...files.values()];
  }

  /** A protobufjs Root holding the types of `symbol`'s file and its imports, built only from reflection. */
  async rootFor(symbol) {
    return protobuf.Root.fromDescriptor({ file: await this.filesFor(symbol) });
  }

  close() {
    this.call.end();
    this.client.close();
  }
}

function dependencies(files) {
  return [...new Set([...files.values()].flatMap((f) => f.dependency))].filter((name) => !files.has(name));
}

function failOn(response) {
  if (response.message_response === "error_response") {
    const { error_code, error_message } = response.error_response;
    throw new Error(`reflection error ${error_code}: ${error_message}`);
  }
}
