#!/usr/bin/env node
// One image + prompt to a Triptych processor with ProcessorService.StreamGenerate: prints the text
// deltas as they arrive, then one JSON line with the completion. protos/ is loaded as it is, at
// run time (@grpc/proto-loader): no generated code.
//
//   node clients/node/generate.js --server 127.0.0.1:50051 --image cat.png --prompt "What is this?"
//
// A gRPC error prints `error: CODE [REASON]: message` on stderr (REASON from the google.rpc.ErrorInfo
// in the `grpc-status-details-bin` trailer, as `triptych generate` prints it) and exits 1.
"use strict";

const fs = require("node:fs");
const path = require("node:path");
const { parseArgs } = require("node:util");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTOS = path.resolve(__dirname, "..", "..", "protos");
const FINISH_NAMES = { FINISH_REASON_STOP: "stop", FINISH_REASON_LENGTH: "length" };
const CODE_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([name, code]) => [code, name]));
const USAGE = "usage: generate.js --server HOST:PORT --image PATH --prompt TEXT [--max-new-tokens N] [--timeout-s S]";

function loadProcessorService() {
  const definition = protoLoader.loadSync("triptych/processor/v1/processor.proto", {
    includeDirs: [PROTOS],
    keepCase: true, // field names as the proto spells them: token_ids, text_delta
    longs: Number, // int64 token ids and counts fit a double exactly
    enums: String, // finish_reason: "FINISH_REASON_STOP"
    defaults: true, // unset scalars and repeated fields read as 0, "" and []
    oneofs: true, // `event` names which of text_delta / completion a message carries
  });
  return grpc.loadPackageDefinition(definition).triptych.processor.v1.ProcessorService;
}

// ---- google.rpc.Status from the trailer, read with a few lines of protobuf wire format ----

/** Yields [field number, wire type, value] of one encoded message; value is a Buffer for wire type 2. */
function* wireFields(buf) {
  let pos = 0;
  const varint = () => {
    let result = 0;
    for (let shift = 0; ; shift += 7) {
      const byte = buf[pos++];
      if (byte === undefined) throw new Error("truncated varint");
      result += (byte & 0x7f) * 2 ** shift;
      if (byte < 0x80) return result;
    }
  };
  while (pos < buf.length) {
    const tag = varint();
    const [field, wireType] = [Math.floor(tag / 8), tag % 8];
    if (wireType === 0) yield [field, wireType, varint()];
    else if (wireType === 1) pos += 8;
    else if (wireType === 5) pos += 4;
    else if (wireType === 2) {
      const length = varint();
      yield [field, wireType, buf.subarray(pos, pos + length)];
      pos += length;
    } else throw new Error(`unsupported wire type ${wireType}`);
  }
}

/** The reason of the google.rpc.ErrorInfo among the call's status details, or null. */
function errorInfoReason(err) {
  const [details] = (err.metadata && err.metadata.get("grpc-status-details-bin")) || [];
  if (!details) return null;
  try {
    for (const [field, , any] of wireFields(details)) { // Status.details = 3: repeated google.protobuf.Any
      if (field !== 3) continue;
      let typeUrl = "";
      let value = Buffer.alloc(0);
      for (const [anyField, , data] of wireFields(any)) {
        if (anyField === 1) typeUrl = data.toString("utf8");
        else if (anyField === 2) value = data;
      }
      if (!typeUrl.endsWith("/google.rpc.ErrorInfo")) continue;
      for (const [infoField, , data] of wireFields(value)) {
        if (infoField === 1) return data.toString("utf8"); // ErrorInfo.reason = 1
      }
    }
  } catch {
    return null; // a malformed trailer: the code and message still tell the story
  }
  return null;
}

function main() {
  let args;
  try {
    ({ values: args } = parseArgs({
      options: {
        server: { type: "string", default: "127.0.0.1:50051" },
        image: { type: "string" },
        prompt: { type: "string" },
        "max-new-tokens": { type: "string", default: "64" },
        "timeout-s": { type: "string", default: "600" },
      },
    }));
  } catch (err) {
    console.error(`error: ${err.message}\n${USAGE}`);
    return process.exit(2);
  }
  const maxNewTokens = Number(args["max-new-tokens"]);
  const timeoutS = Number(args["timeout-s"]);
  if (!args.image || args.prompt === undefined || !Number.isInteger(maxNewTokens) || !(timeoutS > 0)) {
    console.error(USAGE);
    return process.exit(2);
  }
  let image;
  try {
    image = fs.readFileSync(args.image);
  } catch (err) {
    console.error(`error: cannot read image: ${err.message}`);
    return process.exit(2);
  }

  const ProcessorService = loadProcessorService();
  const client = new ProcessorService(args.server, grpc.credentials.createInsecure());
  // One user message, the image first and then the prompt, as HF chat templates order them.
  const request = {
    messages: [{ role: "user", content: [{ image: { data: image } }, { text: args.prompt }] }],
    sampling: { max_new_tokens: maxNewTokens }, // temperature 0: greedy
  };
  const call = client.StreamGenerate(request, { deadline: Date.now() + timeoutS * 1000 });
  process.once("SIGINT", () => call.cancel()); // cancelling stops generation on the server

  let completion = null;
  let failed = false;
  call.on("data", (message) => {
    if (message.event === "text_delta") process.stdout.write(message.text_delta);
    else if (message.event === "completion") completion = message.completion;
  });
  call.on("error", (err) => {
    const reason = errorInfoReason(err);
    const code = CODE_NAMES[err.code] || String(err.code);
    const message = (err.details || err.message || "").split(/\s+/).join(" ").trim(); // one line
    console.error(`error: ${code}${reason ? ` [${reason}]` : ""}: ${message}`);
    failed = true;
    client.close();
    process.exitCode = 1;
  });
  call.on("end", () => {
    client.close();
    if (failed) return; // the error handler has reported it
    if (completion === null) {
      console.error("error: the stream ended without a completion");
      process.exitCode = 1;
      return;
    }
    process.stdout.write("\n");
    console.log(JSON.stringify({
      token_ids: completion.token_ids,
      prompt_tokens: completion.prompt_tokens,
      completion_tokens: completion.completion_tokens,
      finish_reason: FINISH_NAMES[completion.finish_reason] || "unspecified",
    }));
  });
}

main();
