'use strict';
/**
 * A tier: several broker replicas (say the pods behind a headless
 * Kubernetes Service) that one client spreads its calls over.
 *
 * grpc-js (1.14) does not do client-side health checking: its service
 * config parser drops `healthCheckConfig`, so a draining replica would keep
 * getting calls from a `round_robin` channel until its listener closed.
 * This module does the equivalent with the least machinery: one channel per
 * replica, each watching the standard health service (grpc.health.v1
 * Health/Watch, service "broker.v1.Broker", which a broker turns
 * NOT_SERVING the moment it starts draining), and calls handed round-robin
 * to the replicas that are SERVING.
 *
 * - A list of addresses is dialled as given. A "dns:///name:port" target is
 *   looked up with the system resolver (`dns.lookup`, all addresses) at
 *   once, every 30 s, and sooner when no replica is serving; a replica
 *   whose address goes is closed, a new one is watched. Its channels send
 *   the name as :authority and, with TLS, check the certificate against
 *   the name, as one channel to the dns target would.
 * - A replica is SERVING only after its Watch said so. One that never
 *   answered yet is CONNECTING: a call waits for it (within its deadline)
 *   when no other replica is SERVING. One that said NOT_SERVING, or whose
 *   Watch broke (its connection failed), gets no calls until its Watch
 *   says SERVING again; with none SERVING and none CONNECTING a call fails
 *   UNAVAILABLE at once, which the client's retry policy may retry.
 * - A broker without the health service (UNIMPLEMENTED) counts as SERVING,
 *   as gRPC's own health checking has it.
 */

const dns = require('node:dns');
const net = require('node:net');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const { BrokerError, DeadlineExceededError, UnavailableError } = require('./errors');

/** The health service name a broker reports for its Broker service. */
const BROKER_SERVICE = 'broker.v1.Broker';
/** How often a dns target is looked up again (as gRPC's own resolvers at most). */
const DNS_REFRESH_MS = 30_000;
/** The least time between two lookups made because nothing was serving. */
const DNS_RETRY_MS = 1_000;
/** The pause before watching a replica again after its Watch ended, doubled up to the max. */
const WATCH_BACKOFF_MS = 200;
const WATCH_BACKOFF_MAX_MS = 5_000;

/** @type {any} */
let healthService = null;

/**
 * grpc.health.v1.Health, from a descriptor here: the package ships only
 * the broker's own proto, and these two messages are all it needs.
 */
function loadHealth() {
  if (healthService === null) {
    const definition = protoLoader.fromJSON(
      {
        nested: {
          grpc: {
            nested: {
              health: {
                nested: {
                  v1: {
                    nested: {
                      HealthCheckRequest: { fields: { service: { type: 'string', id: 1 } } },
                      HealthCheckResponse: {
                        fields: { status: { type: 'ServingStatus', id: 1 } },
                        nested: {
                          ServingStatus: {
                            values: { UNKNOWN: 0, SERVING: 1, NOT_SERVING: 2, SERVICE_UNKNOWN: 3 },
                          },
                        },
                      },
                      Health: {
                        methods: {
                          Check: { requestType: 'HealthCheckRequest', responseType: 'HealthCheckResponse' },
                          Watch: {
                            requestType: 'HealthCheckRequest',
                            responseType: 'HealthCheckResponse',
                            responseStream: true,
                          },
                        },
                      },
                    },
                  },
                },
              },
            },
          },
        },
      },
      { keepCase: true, enums: String, defaults: true },
    );
    healthService = /** @type {any} */ (grpc.loadPackageDefinition(definition)).grpc.health.v1.Health;
  }
  return healthService;
}

/**
 * What a target names: one broker (`null`: a string that is not a dns
 * target), a list of replica addresses, or a dns name to look up.
 * Addresses are "IP:port" ("10.0.0.5:50051", "[fd00::5]:50051") or Unix
 * sockets ("unix:///path", "unix:/path", "/path"), not both. Host names
 * are refused in a list: it is dialled as given, and a name resolved once
 * would go stale when the replicas behind it change; a name that resolves
 * to every replica is one "dns:///name:port" target.
 * @param {string|string[]} target
 * @param {(target: string) => string} normalizeTarget the client's forms of a unix target
 * @returns {null | {addresses: string[]} | {host: string, port: number}}
 */
function parseTier(target, normalizeTarget) {
  if (typeof target === 'string') {
    const t = target.trim();
    return t.startsWith('dns:') ? parseDNSTarget(t) : null;
  }
  if (!Array.isArray(target)) {
    throw new TypeError(`target must be a string or an array of addresses, not ${typeof target}`);
  }
  if (target.length === 0) {
    throw new TypeError('target: no addresses: give at least one "host:port" (or one "dns:///name:port" target)');
  }
  /** @type {string[]} */
  const addresses = [];
  let firstUnix = '';
  let firstTCP = '';
  target.forEach((raw, i) => {
    if (typeof raw !== 'string' || raw.trim() === '') {
      const what = typeof raw === 'string' ? 'empty' : `a ${typeof raw}, not a string`;
      throw new TypeError(`target: address ${i + 1} of ${target.length} is ${what}`);
    }
    const address = parseAddress(raw.trim(), normalizeTarget);
    if (addresses.includes(address)) {
      throw new TypeError(`target: address ${JSON.stringify(raw.trim())} is listed twice`);
    }
    if (address.startsWith('unix:')) firstUnix = firstUnix || raw.trim();
    else firstTCP = firstTCP || raw.trim();
    if (firstUnix && firstTCP) {
      throw new TypeError(
        `target: the addresses mix a unix socket (${JSON.stringify(firstUnix)}) and TCP ` +
          `(${JSON.stringify(firstTCP)}): list replicas of one kind`,
      );
    }
    addresses.push(address);
  });
  return { addresses };
}

/**
 * @param {string} address trimmed
 * @param {(target: string) => string} normalizeTarget
 * @returns {string} "unix:///path", "10.0.0.5:50051" or "[fd00::5]:50051"
 */
function parseAddress(address, normalizeTarget) {
  const quoted = JSON.stringify(address);
  if (address.startsWith('unix:') || address.startsWith('/')) return normalizeTarget(address);
  const scheme = /^([a-z][a-z0-9+.-]*):\//i.exec(address);
  if (scheme || address.startsWith('dns:')) {
    const name = scheme ? scheme[1] : 'dns';
    throw new TypeError(
      `target: address ${quoted}: a list takes host:port addresses and unix sockets, not ${name}: targets ` +
        '(a dns:///name:port target goes alone, as a string)',
    );
  }
  const { host, port } = splitHostPort(address, `target: address ${quoted}`);
  if (net.isIP(host) === 0) {
    throw new TypeError(
      `target: address ${quoted}: ${JSON.stringify(host)} is a host name; a list takes IP addresses ` +
        `(a name resolved once would go stale): give the name as one target, "dns:///${address}", ` +
        'which reaches every address it resolves to',
    );
  }
  return net.isIPv6(host) ? `[${host}]:${port}` : `${host}:${port}`;
}

/**
 * @param {string} hostPort "host:port" or "[v6]:port"
 * @param {string} what the start of an error message
 * @returns {{host: string, port: number}}
 */
function splitHostPort(hostPort, what) {
  const fix = 'write host:port, e.g. 10.0.0.5:50051 or [fd00::5]:50051';
  let host;
  let port;
  const bracketed = /^\[([^\]]+)\]:([^:]*)$/.exec(hostPort);
  if (bracketed) {
    [, host, port] = bracketed;
  } else {
    const colon = hostPort.lastIndexOf(':');
    if (colon < 0 || hostPort.indexOf(':') !== colon) throw new TypeError(`${what} has no port: ${fix}`);
    host = hostPort.slice(0, colon);
    port = hostPort.slice(colon + 1);
  }
  if (host === '' || port === '') throw new TypeError(`${what} has no ${host === '' ? 'host' : 'port'}: ${fix}`);
  const n = Number(port);
  if (!/^\d+$/.test(port) || n < 1 || n > 65535) {
    throw new TypeError(`${what}: port ${JSON.stringify(port)} is not a number from 1 to 65535`);
  }
  return { host, port: n };
}

/**
 * "dns:///name:port" (the system's resolver); "dns://server/..." is refused.
 * @param {string} target
 * @returns {{host: string, port: number}}
 */
function parseDNSTarget(target) {
  const match = /^dns:(?:\/\/([^/]*)\/)?(.*)$/.exec(target);
  const example = 'dns:///mongo-broker.apps.svc.cluster.local:50051';
  if (!match) throw new TypeError(`target ${JSON.stringify(target)}: a dns target is ${example}`);
  if (match[1]) {
    throw new TypeError(
      `target ${JSON.stringify(target)}: naming a DNS server (${match[1]}) is not supported here; ` +
        "write dns:///name:port, which uses the system's resolver",
    );
  }
  return splitHostPort(match[2], `target ${JSON.stringify(target)} (a dns target is ${example})`);
}

/**
 * @typedef {'CONNECTING'|'SERVING'|'NOT_SERVING'|'UNREACHABLE'} ReplicaState
 * @typedef {object} Replica
 * @property {string} address
 * @property {any} stub the Broker client on this replica's own channel
 * @property {any} health the Health client on the same channel
 * @property {ReplicaState} state
 * @property {any} watch the Watch call, while it runs
 * @property {number} backoffMs
 * @property {NodeJS.Timeout|null} timer a pending re-watch
 * @property {boolean} closed
 * @property {string} lastError why its last Watch failed (a refused connection, a TLS check)
 */

/** The replicas of a tier and the round-robin over the SERVING ones. */
class Tier {
  /**
   * @param {{addresses: string[]} | {host: string, port: number}} spec
   * @param {(address: string, options: Record<string, string>) => any} makeStub
   *   a Broker client for one address, with these channel options
   */
  constructor(spec, makeStub) {
    this._makeStub = makeStub;
    /** @type {Map<string, Replica>} by address, in the order they came */
    this._replicas = new Map();
    this._next = 0;
    this._closed = false;
    /** @type {Set<() => void>} calls waiting for a state to change */
    this._waiters = new Set();
    /** @type {{host: string, port: number}|null} */
    this._dns = 'host' in spec ? spec : null;
    this._resolving = false;
    this._lastLookup = 0;
    /** @type {string} why the last lookup failed, '' when it did not */
    this._lookupError = '';
    /** @type {NodeJS.Timeout|null} */
    this._refresh = null;
    if ('addresses' in spec) {
      this._update(spec.addresses);
    } else {
      this._lookup();
      this._refresh = setInterval(() => this._lookup(), DNS_REFRESH_MS);
      // A tier's lookups alone must not keep the process running.
      this._refresh.unref();
    }
  }

  /**
   * The replica for the next call: round-robin over the SERVING ones,
   * `avoid` (the address a failed attempt went to) last. Waits, up to the
   * deadline, while a replica is still CONNECTING and none is SERVING.
   * @param {Date} deadline
   * @param {string} [avoid]
   * @returns {Promise<Replica>}
   */
  async pick(deadline, avoid) {
    for (;;) {
      if (this._closed) throw new BrokerError('the client is closed');
      const serving = [...this._replicas.values()].filter((r) => r.state === 'SERVING');
      if (serving.length > 0) {
        this._next = (this._next + 1) % serving.length;
        let replica = serving[this._next];
        if (replica.address === avoid && serving.length > 1) {
          this._next = (this._next + 1) % serving.length;
          replica = serving[this._next];
        }
        return replica;
      }
      if (this._dns !== null && Date.now() - this._lastLookup >= DNS_RETRY_MS) this._lookup();
      const pending = this._resolving || [...this._replicas.values()].some((r) => r.state === 'CONNECTING');
      if (!pending) {
        throw new UnavailableError(`no broker replica is serving: ${this.describe()}`, { code: grpc.status.UNAVAILABLE });
      }
      if (!(await this._changed(deadline))) {
        throw new DeadlineExceededError(`no broker replica was ready before the deadline: ${this.describe()}`, {
          code: grpc.status.DEADLINE_EXCEEDED,
        });
      }
    }
  }

  /**
   * After an attempt on `address` failed with `error`: a replica that said
   * it is shutting down gets no more calls (its health says so too, a
   * moment later). A broken connection needs nothing here: the channel's
   * state and the Watch on it take the replica out.
   * @param {string} address
   * @param {import('./errors').BrokerError} error
   */
  failed(address, error) {
    const replica = this._replicas.get(address);
    if (replica && error.code === grpc.status.UNAVAILABLE && error.reason === 'SHUTTING_DOWN') {
      this._set(replica, 'NOT_SERVING');
    }
  }

  /** @returns {string} every replica and its state, for error messages. */
  describe() {
    const states = [...this._replicas.values()].map((r) =>
      r.state === 'UNREACHABLE' && r.lastError ? `${r.address} UNREACHABLE (${r.lastError})` : `${r.address} ${r.state}`,
    );
    if (this._dns !== null) {
      const name = `${this._dns.host}:${this._dns.port}`;
      if (this._lookupError) states.push(`dns lookup of ${name} failed: ${this._lookupError}`);
      else if (states.length === 0) states.push(`dns lookup of ${name} found nothing yet`);
    }
    return states.join(', ');
  }

  /** @returns {{address: string, state: ReplicaState}[]} */
  replicas() {
    return [...this._replicas.values()].map((r) => ({ address: r.address, state: r.state }));
  }

  /**
   * Closes every replica's channel; calls waiting for a replica fail.
   * @returns {any[]} the channels, for the caller to wait on
   */
  close() {
    this._closed = true;
    if (this._refresh !== null) clearInterval(this._refresh);
    const channels = [...this._replicas.values()].map((replica) => this._remove(replica));
    this._notify();
    return channels;
  }

  /**
   * Looks the dns name up again; the replicas follow what it gives. A
   * failed lookup keeps the replicas there are.
   */
  _lookup() {
    if (this._resolving || this._closed || this._dns === null) return;
    const { host, port } = this._dns;
    this._resolving = true;
    this._lastLookup = Date.now();
    dns.lookup(host, { all: true }, (error, found) => {
      this._resolving = false;
      if (this._closed) return;
      if (error) {
        this._lookupError = error.code || error.message;
      } else {
        this._lookupError = '';
        this._update(found.map(({ address, family }) => (family === 6 ? `[${address}]:${port}` : `${address}:${port}`)));
      }
      this._notify();
    });
  }

  /**
   * @param {string[]} addresses the replicas there are now
   */
  _update(addresses) {
    const wanted = new Set(addresses);
    for (const replica of [...this._replicas.values()]) {
      if (!wanted.has(replica.address)) this._remove(replica);
    }
    for (const address of addresses) {
      if (this._replicas.has(address)) continue;
      const stub = this._makeStub(address, this._channelOptions());
      const Health = loadHealth();
      const health = new Health(address, grpc.credentials.createInsecure(), { channelOverride: stub.getChannel() });
      /** @type {Replica} */
      const replica = {
        address,
        stub,
        health,
        state: 'CONNECTING',
        watch: null,
        backoffMs: WATCH_BACKOFF_MS,
        timer: null,
        closed: false,
        lastError: '',
      };
      this._replicas.set(address, replica);
      this._follow(replica);
      this._watch(replica);
    }
  }

  /**
   * The channel options of a replica. A dns tier's channels dial IP
   * addresses but speak for the name, as one gRPC channel to the dns
   * target would: the name is the :authority, and with TLS the name the
   * certificate must carry (not the pod's IP).
   * @returns {Record<string, string>}
   */
  _channelOptions() {
    if (this._dns === null) return {};
    const { host, port } = this._dns;
    return { 'grpc.default_authority': `${host}:${port}`, 'grpc.ssl_target_name_override': host };
  }

  /**
   * @param {Replica} replica
   * @returns {any} its channel
   */
  _remove(replica) {
    replica.closed = true;
    this._replicas.delete(replica.address);
    if (replica.timer !== null) clearTimeout(replica.timer);
    if (replica.watch !== null) replica.watch.cancel();
    const channel = replica.stub.getChannel();
    // Calls already on its channel finish; a closed channel takes no new ones.
    replica.stub.close();
    return channel;
  }

  /**
   * Follows a replica's channel. One that fails to connect is UNREACHABLE
   * at once (as gRPC fails a call fast when no connection is up), rather
   * than CONNECTING until the deadline of every call that waits for it.
   * One whose connection goes (a GOAWAY: the broker stopping its listeners,
   * or its max_connection_age) is watched afresh on the next connection,
   * as gRPC's own health checking watches each connection: the old Watch
   * stream would otherwise hold a stopping broker until its grace ran out.
   * @param {Replica} replica
   */
  _follow(replica) {
    const channel = replica.stub.getChannel();
    const { READY, SHUTDOWN, TRANSIENT_FAILURE } = grpc.connectivityState;
    let wasReady = false;
    const follow = () => {
      if (replica.closed) return;
      const state = channel.getConnectivityState(true);
      if (state === SHUTDOWN) return;
      if (state === TRANSIENT_FAILURE && replica.state !== 'NOT_SERVING') {
        this._set(replica, 'UNREACHABLE');
        this._learnWhy(replica);
      }
      if (wasReady && state !== READY) {
        // Until the next connection's Watch answers (a draining one stays out).
        if (replica.state === 'SERVING') this._set(replica, 'CONNECTING');
        this._rewatch(replica, 0);
      }
      wasReady = state === READY;
      channel.watchConnectivityState(state, Infinity, follow);
    };
    follow();
  }

  /**
   * Why a replica's channel fails to connect (refused, a TLS check, ...),
   * for error messages: a call that does not wait for the connection fails
   * at once with the channel's last error.
   * @param {Replica} replica
   */
  _learnWhy(replica) {
    replica.health.Check({ service: BROKER_SERVICE }, { deadline: Date.now() + 1000 }, (/** @type {any} */ error) => {
      if (error && replica.state === 'UNREACHABLE') replica.lastError = String(error.details || error.message);
    });
  }

  /**
   * Watches a replica's health: a stream of its status, kept open; waits
   * for the connection (wait-for-ready), so a replica that is down is
   * watched again as soon as it is back.
   * @param {Replica} replica
   */
  _watch(replica) {
    const metadata = new grpc.Metadata();
    metadata.setOptions({ waitForReady: true });
    const call = replica.health.Watch({ service: BROKER_SERVICE }, metadata);
    replica.watch = call;
    call.on('data', (/** @type {{status: string}} */ message) => {
      replica.backoffMs = WATCH_BACKOFF_MS;
      replica.lastError = '';
      this._set(replica, message.status === 'SERVING' ? 'SERVING' : 'NOT_SERVING');
    });
    call.on('error', (/** @type {any} */ error) => {
      if (replica.watch !== call) return;
      replica.watch = null;
      if (replica.closed) return;
      if (error.code === grpc.status.UNIMPLEMENTED) {
        // No health service there: serving, as far as anyone can tell.
        this._set(replica, 'SERVING');
        return;
      }
      replica.lastError = String(error.details || error.message);
      this._set(replica, 'UNREACHABLE');
      this._rewatch(replica, replica.backoffMs);
      replica.backoffMs = Math.min(WATCH_BACKOFF_MAX_MS, replica.backoffMs * 2);
    });
    call.on('end', () => {
      // The server ended the stream (it is stopping): watch again.
      if (replica.watch !== call || replica.closed) return;
      replica.watch = null;
      this._set(replica, 'UNREACHABLE');
      this._rewatch(replica, replica.backoffMs);
    });
  }

  /**
   * @param {Replica} replica
   * @param {number} delayMs
   */
  _rewatch(replica, delayMs) {
    if (replica.watch !== null) {
      const old = replica.watch;
      replica.watch = null;
      old.cancel();
    }
    if (replica.timer !== null) clearTimeout(replica.timer);
    replica.timer = setTimeout(() => {
      replica.timer = null;
      if (!replica.closed && replica.watch === null) this._watch(replica);
    }, delayMs);
    replica.timer.unref();
  }

  /**
   * @param {Replica} replica
   * @param {ReplicaState} state
   */
  _set(replica, state) {
    if (replica.state === state) return;
    replica.state = state;
    this._notify();
  }

  _notify() {
    const waiters = [...this._waiters];
    this._waiters.clear();
    for (const wake of waiters) wake();
  }

  /**
   * Resolves true at the next state change, false at the deadline.
   * @param {Date} deadline
   * @returns {Promise<boolean>}
   */
  _changed(deadline) {
    const left = deadline.getTime() - Date.now();
    if (left <= 0) return Promise.resolve(false);
    return new Promise((resolve) => {
      const wake = () => {
        clearTimeout(timer);
        resolve(true);
      };
      const timer = setTimeout(() => {
        this._waiters.delete(wake);
        resolve(false);
      }, left);
      this._waiters.add(wake);
    });
  }
}

module.exports = { BROKER_SERVICE, DNS_REFRESH_MS, Tier, parseTier, loadHealth };
