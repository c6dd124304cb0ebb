#!/usr/bin/env node
// Route to a model through modeld, call the demo backend's Predict on the replica
// it names, then Release the lease. Exits 1 with the gRPC status on any error.
"use strict";

const fs = require("node:fs");
const path = require("node:path");
const { parseArgs } = require("node:util");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTOS = path.resolve(__dirname, "..", "..", "protos");
const USAGE = `usage: node client.js [MODEL] [options]

Routes MODEL (default: echo) through modeld, sends PROMPT to the replica's
backend.Backend/Predict, prints the reply, and releases the lease.

options:
  --addr ADDR        modeld address: host:port or unix:///path.sock
                     (default: $MODELD_ADDR, else 127.0.0.1:50051)
  --prompt TEXT      what to send to Predict (default: "hello from node")
  --timeout SECONDS  deadline of each call (default: 60; a cold start waits for the load)
  --token-file FILE  send the first token of FILE as 'authorization: Bearer <token>'
                     (default: $MODELD_TOKEN_FILE)
  --ca FILE          talk TLS to modeld, trusting this PEM CA bundle
  --cert FILE        client certificate (PEM) for mutual TLS; with --key and --ca
  --key FILE         client private key (PEM) for mutual TLS
  -h, --help         show this help`;

function options(argv) {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      addr: { type: "string", default: process.env.MODELD_ADDR || "127.0.0.1:50051" },
      prompt: { type: "string", default: "hello from node" },
      timeout: { type: "string", default: "60" },
      "token-file": { type: "string", default: process.env.MODELD_TOKEN_FILE || "" },
      ca: { type: "string", default: "" },
      cert: { type: "string", default: "" },
      key: { type: "string", default: "" },
      help: { type: "boolean", short: "h", default: false },
    },
  });
  if (positionals.length > 1) throw new Error(`expected at most one MODEL, got ${positionals.join(" ")}`);
  if (Boolean(values.cert) !== Boolean(values.key)) throw new Error("--cert and --key go together");
  if (values.cert && !values.ca) throw new Error("--cert and --key need --ca");
  const timeout = Number(values.timeout);
  if (!(timeout > 0)) throw new Error(`--timeout must be a positive number, got ${values.timeout}`);
  return { ...values, timeout, model: positionals[0] || "echo" };
}

function loadProtos() {
  const definition = protoLoader.loadSync(["modeld/v1/modeld.proto", "backend/backend.proto"], {
    includeDirs: [PROTOS],
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
  });
  return grpc.loadPackageDefinition(definition);
}

function firstToken(file) {
  const token = fs
    .readFileSync(file, "utf8")
    .split("\n")
    .map((line) => line.trim())
    .find((line) => line && !line.startsWith("#"));
  if (!token) throw new Error(`${file}: no token in it`);
  return token;
}

// Channel credentials for modeld, and the metadata every call to it carries.
function connection(opts) {
  const read = (file) => (file ? fs.readFileSync(file) : null);
  const creds = opts.ca
    ? grpc.credentials.createSsl(read(opts.ca), read(opts.key), read(opts.cert))
    : grpc.credentials.createInsecure();
  const metadata = new grpc.Metadata();
  if (opts["token-file"]) metadata.set("authorization", `Bearer ${firstToken(opts["token-file"])}`);
  return { creds, metadata };
}

// One unary call with a deadline, as a promise.
function call(client, method, request, seconds, metadata = new grpc.Metadata()) {
  const deadline = new Date(Date.now() + seconds * 1000);
  return new Promise((resolve, reject) => {
    client[method](request, metadata, { deadline }, (err, reply) => (err ? reject(err) : resolve(reply)));
  });
}

async function run(opts) {
  const { modeld, backend } = loadProtos();
  const { creds, metadata } = connection(opts);
  const control = new modeld.v1.ModelControl(opts.addr, creds);
  try {
    const lease = await call(control, "Route", { model: opts.model }, opts.timeout, metadata);
    console.error(
      `lease ${lease.lease_id} on replica ${lease.replica_id} at ${lease.address}` +
        (lease.cold_start ? " (cold start)" : "")
    );
    let outcome = "BACKEND_ERROR";
    try {
      if (lease.protocol !== "GRPC") throw new Error(`replica speaks ${lease.protocol}, not gRPC`);
      const replica = new backend.Backend(lease.address, grpc.credentials.createInsecure());
      try {
        const reply = await call(replica, "Predict", { Prompt: opts.prompt }, opts.timeout);
        console.log(Buffer.from(reply.message).toString("utf8"));
        outcome = "OK";
      } catch (err) {
        if (err.code === grpc.status.UNAVAILABLE) outcome = "BACKEND_UNREACHABLE";
        throw err;
      } finally {
        replica.close();
      }
    } finally {
      await call(control, "Release", { lease_id: lease.lease_id, outcome }, opts.timeout, metadata);
    }
  } finally {
    control.close();
  }
}

function describe(err) {
  if (typeof err.code === "number") {
    const name = Object.keys(grpc.status).find((key) => grpc.status[key] === err.code) || err.code;
    return `${name}: ${err.details || err.message}`;
  }
  return err.message;
}

async function main() {
  let opts;
  try {
    opts = options(process.argv.slice(2));
  } catch (err) {
    console.error(`client.js: ${err.message}\n\n${USAGE}`);
    return 2;
  }
  if (opts.help) {
    console.log(USAGE);
    return 0;
  }
  try {
    await run(opts);
    return 0;
  } catch (err) {
    console.error(`client.js: ${describe(err)}`);
    return 1;
  }
}

main().then((code) => {
  process.exitCode = code;
});
