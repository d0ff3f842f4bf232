#!/usr/bin/env node
// A small relay.v1.RelayService client: the proto is loaded at run time, no generated code.
//
//   node client.js start --subscribe-url URL --publish-url URL --processor-url URL [--id ID] [--prompts JSON]
//       [--control-url URL] [--events-url URL] [--data-url URL] [--gateway-request-id ID]
//       [--width W --height H] [--max-fps N] [--preset P] [--bitrate BPS] [--gop S]
//       [--scale-mode letterbox|crop] [--fill repeat|hold] [--mode auto|transcode|passthrough]
//       [--allow-shared-processor] [--offer-timeout S] [--latency-budget S] [--attempts N]
//   node client.js get ID
//   node client.js list                   (every session: follows ListSessions' pages to the end)
//   node client.js watch ID [--count N] [--interval S]
//   node client.js stop ID
//
// Options: --server HOST:PORT (default $RELAY_ADDRESS or 127.0.0.1:50051), --token TOKEN
// (default $RELAY_AUTH_TOKEN; sent as `authorization: Bearer TOKEN`), --tls, --ca-cert PATH.
// Prints JSON (watch: one snapshot a line). Exit status: 1 for an RPC error, 2 for bad usage.
//
// Behind a proxy in front of several relay replicas: every call that names a session carries it as
// `relay-session-id` metadata, for the proxy to route by. `start` without --id, refused by a full
// (SESSION_LIMIT_REACHED) or draining (DRAINING) replica, is tried again at once, up to --attempts
// times (default 3).
'use strict';

const fs = require('node:fs');
const path = require('node:path');
const { parseArgs } = require('node:util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
// The protobufjs that @grpc/proto-loader is built on (package.json names no copy of its own).
const protobuf = require(
  require.resolve('protobufjs', { paths: [path.dirname(require.resolve('@grpc/proto-loader'))] }),
);

const PROTO_ROOT = path.join(__dirname, '..', '..', 'proto');
const DEADLINE_MS = 30_000;
const DEFAULT_ATTEMPTS = 3; // StartSession calls for `start` without --id
// A proxy cannot read protobuf requests: it routes a call to the replica that owns the session by this header.
const SESSION_HEADER = 'relay-session-id';
// The refusals of a StartSession that created nothing, and that another replica may accept.
const RETRIED_REASONS = new Set(['SESSION_LIMIT_REACHED', 'DRAINING']);
const USAGE = `usage: node client.js [--server HOST:PORT] [--token T] [--tls] [--ca-cert PATH] COMMAND
  start --subscribe-url URL --publish-url URL --processor-url URL [--id ID] [--prompts JSON]
        [--control-url URL] [--events-url URL] [--data-url URL] [--gateway-request-id ID]
        [--width W --height H] [--max-fps N] [--preset P] [--bitrate BPS] [--gop S]
        [--scale-mode letterbox|crop] [--fill repeat|hold] [--mode auto|transcode|passthrough]
        [--allow-shared-processor] [--offer-timeout S] [--latency-budget S] [--attempts N]
  get ID | stop ID | list
  watch ID [--count N] [--interval S]`;

class UsageError extends Error {}

function loadService() {
  const definition = protoLoader.loadSync('relay/v1/relay_service.proto', {
    includeDirs: [PROTO_ROOT], // google/protobuf/*.proto come bundled with protobufjs
    keepCase: true,
    longs: Number,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).relay.v1.RelayService;
}

// -- error details ----------------------------------------------------------------------------------

// google.rpc.Status and ErrorInfo, as far as this client reads them (decoding skips other fields).
const RPC_TYPES = protobuf.Root.fromJSON({
  nested: {
    google: {
      nested: {
        protobuf: {
          nested: { Any: { fields: { type_url: { type: 'string', id: 1 }, value: { type: 'bytes', id: 2 } } } },
        },
        rpc: {
          nested: {
            Status: { fields: { details: { rule: 'repeated', type: 'google.protobuf.Any', id: 3 } } },
            ErrorInfo: { fields: { reason: { type: 'string', id: 1 } } },
          },
        },
      },
    },
  },
});
const Status = RPC_TYPES.lookupType('google.rpc.Status');
const ErrorInfo = RPC_TYPES.lookupType('google.rpc.ErrorInfo');
const ERROR_INFO_URL = 'type.googleapis.com/google.rpc.ErrorInfo';

// The reason from an error's google.rpc.ErrorInfo, in its grpc-status-details-bin trailer ('' without one).
function errorReason(error) {
  const [details] = error.metadata?.get('grpc-status-details-bin') ?? [];
  if (!details) return '';
  const info = Status.decode(details).details.find((any) => any.type_url === ERROR_INFO_URL);
  return info ? ErrorInfo.decode(info.value).reason : '';
}

// -- google.protobuf.Struct <-> plain JSON ----------------------------------------------------------

function toValue(value) {
  if (value === null) return { nullValue: 'NULL_VALUE' };
  if (Array.isArray(value)) return { listValue: { values: value.map(toValue) } };
  switch (typeof value) {
    case 'number': return { numberValue: value };
    case 'string': return { stringValue: value };
    case 'boolean': return { boolValue: value };
    case 'object': return { structValue: toStruct(value) };
    default: throw new UsageError(`cannot send ${typeof value} in a workflow`);
  }
}

function toStruct(object) {
  return { fields: Object.fromEntries(Object.entries(object).map(([k, v]) => [k, toValue(v)])) };
}

function fromValue(value) {
  switch (value.kind) {
    case 'structValue': return fromStruct(value.structValue);
    case 'listValue': return value.listValue.values.map(fromValue);
    case 'nullValue': return null;
    default: return value[value.kind];
  }
}

function fromStruct(struct) {
  return Object.fromEntries(Object.entries(struct.fields).map(([k, v]) => [k, fromValue(v)]));
}

// -- output -----------------------------------------------------------------------------------------

const seconds = (d) => (d ? Number(d.seconds) + d.nanos / 1e9 : null);
const isoTime = (t) => (t ? new Date(seconds(t) * 1000).toISOString() : null);

// A Session as plain JSON: times as ISO strings, durations in seconds, workflows as objects.
function plainSession(session) {
  const { config, stats } = session;
  return {
    ...session,
    created_time: isoTime(session.created_time),
    state_time: isoTime(session.state_time),
    config: config && {
      ...config,
      prompts: config.prompts.map(fromStruct),
      encoder: config.encoder && { ...config.encoder, gop: seconds(config.encoder.gop) },
      offer_timeout: seconds(config.offer_timeout),
      latency_budget: seconds(config.latency_budget),
    },
    stats: stats && {
      ...stats,
      latency: stats.latency && Object.fromEntries(
        Object.entries(stats.latency).map(([k, v]) => [k, seconds(v)]),
      ),
    },
  };
}

const print = (value, indent = 2) => process.stdout.write(JSON.stringify(value, null, indent) + '\n');

// -- commands ---------------------------------------------------------------------------------------

const OPTIONS = {
  server: { type: 'string', default: process.env.RELAY_ADDRESS || '127.0.0.1:50051' },
  token: { type: 'string', default: process.env.RELAY_AUTH_TOKEN || '' },
  tls: { type: 'boolean', default: false },
  'ca-cert': { type: 'string' },
  id: { type: 'string', default: '' },
  'subscribe-url': { type: 'string', default: '' },
  'publish-url': { type: 'string', default: '' },
  'processor-url': { type: 'string', default: '' },
  'control-url': { type: 'string', default: '' },
  'events-url': { type: 'string', default: '' },
  'data-url': { type: 'string', default: '' },
  'gateway-request-id': { type: 'string', default: '' },
  prompts: { type: 'string' },
  width: { type: 'string' },
  height: { type: 'string' },
  'max-fps': { type: 'string' },
  preset: { type: 'string', default: '' },
  bitrate: { type: 'string' },
  gop: { type: 'string' },
  'scale-mode': { type: 'string' },
  fill: { type: 'string' },
  mode: { type: 'string' },
  'allow-shared-processor': { type: 'boolean', default: false },
  'offer-timeout': { type: 'string' },
  'latency-budget': { type: 'string' },
  count: { type: 'string' },
  interval: { type: 'string' },
  attempts: { type: 'string', default: String(DEFAULT_ATTEMPTS) },
  help: { type: 'boolean', short: 'h', default: false },
};

function parsePrompts(text) {
  if (text === undefined) return [];
  let value;
  try {
    value = JSON.parse(text);
  } catch (error) {
    throw new UsageError(`--prompts: not JSON: ${error.message}`);
  }
  const workflows = Array.isArray(value) ? value : [value];
  return workflows.map((workflow, index) => {
    if (workflow === null || typeof workflow !== 'object' || Array.isArray(workflow)) {
      throw new UsageError(`--prompts: workflow ${index} is not a JSON object`);
    }
    return toStruct(workflow);
  });
}

function positiveNumber(name, text) {
  const value = Number(text);
  if (!(value > 0)) throw new UsageError(`--${name}: expected a positive number, got ${JSON.stringify(text)}`);
  return value;
}

// A whole number >= min (width, height, bitrate: 0 leaves the relay's default).
function count(name, text, min = 0) {
  if (text === undefined) return 0;
  const value = Number(text);
  if (!Number.isInteger(value) || value < min) {
    throw new UsageError(`--${name}: expected a whole number >= ${min}, got ${JSON.stringify(text)}`);
  }
  return value;
}

// google.protobuf.Duration as proto-loader takes it: whole seconds and nanoseconds.
function duration(name, text) {
  const nanos = Math.round(positiveNumber(name, text) * 1e9);
  return { seconds: Math.floor(nanos / 1e9), nanos: nanos % 1e9 };
}

// An enum option's value: the proto name, from the short name the flag takes.
function choice(name, text, prefix, names) {
  if (text === undefined) return undefined;
  if (!names.includes(text)) throw new UsageError(`--${name}: one of ${names.join(', ')}, got ${JSON.stringify(text)}`);
  return `${prefix}${text.toUpperCase()}`;
}

function startRequest(options) {
  const request = {
    session_id: options.id,
    subscribe_url: options['subscribe-url'],
    publish_url: options['publish-url'],
    processor_url: options['processor-url'],
    control_url: options['control-url'],
    events_url: options['events-url'],
    data_url: options['data-url'],
    gateway_request_id: options['gateway-request-id'],
    prompts: parsePrompts(options.prompts),
    width: count('width', options.width),
    height: count('height', options.height),
    max_fps: options['max-fps'] === undefined ? 0 : positiveNumber('max-fps', options['max-fps']),
    encoder: { preset: options.preset, bitrate: count('bitrate', options.bitrate) },
    allow_shared_processor: options['allow-shared-processor'],
    scale_mode: choice('scale-mode', options['scale-mode'], 'SCALE_MODE_', ['letterbox', 'crop']),
    output_fill: choice('fill', options.fill, 'OUTPUT_FILL_', ['repeat', 'hold']),
    mode: choice('mode', options.mode, 'SESSION_MODE_', ['auto', 'transcode', 'passthrough']),
  };
  if (options.gop !== undefined) request.encoder.gop = duration('gop', options.gop);
  if (options['offer-timeout'] !== undefined) request.offer_timeout = duration('offer-timeout', options['offer-timeout']);
  if (options['latency-budget'] !== undefined) {
    request.latency_budget = duration('latency-budget', options['latency-budget']);
  }
  return request;
}

// Every session: ListSessions a page at a time until next_page_token is empty.
async function listSessions(client, metadata) {
  const sessions = [];
  let page_token = '';
  do {
    const page = await unary(client, 'ListSessions', { page_token }, metadata);
    sessions.push(...page.sessions);
    page_token = page.next_page_token;
  } while (page_token);
  return sessions;
}

function connect(options) {
  let credentials = grpc.credentials.createInsecure();
  if (options.tls || options['ca-cert']) {
    const roots = options['ca-cert'] ? fs.readFileSync(options['ca-cert']) : null;
    credentials = grpc.credentials.createSsl(roots);
  }
  const RelayService = loadService();
  return new RelayService(options.server, credentials);
}

// The token, and the session the call names (none for list, or start without --id).
function callMetadata(options, sessionId) {
  const metadata = new grpc.Metadata();
  if (options.token) metadata.set('authorization', `Bearer ${options.token}`);
  // An id that is not printable ASCII cannot be a header value, nor a session id: sent without
  // the header, it reaches some replica, which says what is wrong with it.
  if (sessionId && /^[ -~]+$/.test(sessionId)) metadata.set(SESSION_HEADER, sessionId);
  return metadata;
}

function unary(client, method, request, metadata) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata, { deadline: Date.now() + DEADLINE_MS }, (error, response) =>
      (error ? reject(error) : resolve(response)));
  });
}

// StartSession. Without a session id the proxy sends each call to the next replica, so a refusal
// that created nothing (full, draining) is tried again at once, up to `attempts` calls. With an id
// the proxy would send the retry to the same replica: one call.
async function startSession(client, request, metadata, attempts) {
  const retries = request.session_id ? 0 : attempts - 1;
  for (let retry = 0; retry < retries; retry += 1) {
    try {
      return await unary(client, 'StartSession', request, metadata);
    } catch (error) {
      if (!RETRIED_REASONS.has(errorReason(error))) throw error; // it may have created the session
    }
  }
  return unary(client, 'StartSession', request, metadata);
}

function watch(client, request, metadata, count) {
  return new Promise((resolve, reject) => {
    const call = client.WatchSession(request, metadata);
    let seen = 0;
    call.on('data', ({ session }) => {
      print(plainSession(session), 0);
      seen += 1;
      if (count !== undefined && seen >= count) {
        call.cancel();
        resolve();
      }
    });
    call.on('end', resolve); // the session ended: its final snapshot was the last
    call.on('error', (error) => (error.code === grpc.status.CANCELLED ? resolve() : reject(error)));
  });
}

async function run(argv) {
  const { values: options, positionals } = parseArgs({ args: argv, options: OPTIONS, allowPositionals: true });
  const [command, sessionId, ...extra] = positionals;
  if (options.help) {
    process.stdout.write(USAGE + '\n');
    return;
  }
  const needsId = ['get', 'stop', 'watch'].includes(command);
  if (!['start', 'list', ...(needsId ? [command] : [])].includes(command)) {
    throw new UsageError(command ? `unknown command ${JSON.stringify(command)}` : 'a command is required');
  }
  if (needsId ? !sessionId || extra.length : sessionId !== undefined) {
    throw new UsageError(needsId ? `${command} takes one session id` : `${command} takes no positional argument`);
  }
  const client = connect(options);
  const metadata = callMetadata(options, command === 'start' ? options.id : sessionId);
  try {
    switch (command) {
      case 'start': {
        const attempts = count('attempts', options.attempts, 1);
        const { session } = await startSession(client, startRequest(options), metadata, attempts);
        print(plainSession(session));
        break;
      }
      case 'get':
      case 'stop': {
        const method = command === 'get' ? 'GetSession' : 'StopSession';
        const { session } = await unary(client, method, { session_id: sessionId }, metadata);
        print(plainSession(session));
        break;
      }
      case 'list': {
        const sessions = await listSessions(client, metadata);
        print({ sessions: sessions.map(plainSession) });
        break;
      }
      case 'watch': {
        const count = options.count === undefined ? undefined : positiveNumber('count', options.count);
        const request = { session_id: sessionId };
        if (options.interval !== undefined) request.interval = duration('interval', options.interval);
        await watch(client, request, metadata, count);
        break;
      }
    }
  } finally {
    client.close();
  }
}

const STATUS_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([name, code]) => [code, name]));

run(process.argv.slice(2)).catch((error) => {
  if (error instanceof UsageError || String(error.code).startsWith('ERR_PARSE_ARGS')) {
    process.stderr.write(`error: ${error.message}\n${USAGE}\n`);
    process.exitCode = 2;
  } else if (typeof error.code === 'number') {
    process.stderr.write(`error: ${STATUS_NAMES[error.code] ?? error.code}: ${error.details}\n`);
    process.exitCode = 1;
  } else {
    process.stderr.write(`error: ${error.stack || error}\n`);
    process.exitCode = 1;
  }
});
