import { createPrivateKey, type KeyObject, X509Certificate } from "node:crypto"
import { type FSWatcher, readFileSync, watch } from "node:fs"
import * as path from "node:path"
import * as tls from "node:tls"
import { Context, Effect, Layer, Result } from "effect"
import { AppConfig, ConfigError, type ConfigProblem, settings } from "../config/index.ts"
import { tidepoolError } from "../errors/index.ts"

/**
 * Certificate renewals write the certificate and the key as separate steps (or swap a symlinked
 * directory, as Kubernetes does); one reload after the burst sees the finished pair.
 */
const RELOAD_DEBOUNCE_MS = 250

interface Loaded {
  readonly context: tls.SecureContext
  /** Key type, subject and expiry of each certificate, for the log. */
  readonly description: string
  readonly expired: boolean
}

/** Logged on every load, so operators see which certificate serves and until when. */
const logLoaded = (what: string, loaded: Loaded) =>
  loaded.expired
    ? Effect.logWarning(`${what} (a certificate has EXPIRED; clients will refuse it): ${loaded.description}`)
    : Effect.logInfo(`${what}: ${loaded.description}`)

const split = (list: string): Array<string> => (list === "" ? [] : list.split(","))

/** Coded, so an alert can match it: a renewal that does not take effect fails quietly otherwise. */
const logReloadProblem = (reason: string) => {
  const error = tidepoolError("ETLSRELOAD", reason)
  return Effect.logWarning(error.message).pipe(Effect.annotateLogs({ code: error.code }))
}

const errorCode = (error: unknown): string => (error as NodeJS.ErrnoException).code ?? String(error)

// OpenSSL's reason ("key values mismatch", "no start line") names the problem, not the secret.
const opensslReason = (error: unknown): string => (error as { reason?: string }).reason ?? (error as Error).message

/**
 * Reads the certificate/key pairs into one SecureContext (several pairs: one per key type, so an
 * RSA and an ECDSA certificate can be served side by side and the client's cipher suites choose).
 * Fails with the reason in words, never with key material.
 */
const loadContext = (
  certPaths: ReadonlyArray<string>,
  keyPaths: ReadonlyArray<string>
): Result.Result<Loaded, ConfigProblem> => {
  const read = (file: string, env: string): Result.Result<Buffer, ConfigProblem> => {
    try {
      return Result.succeed(readFileSync(file))
    } catch (error) {
      return Result.fail({
        path: env,
        reason: `cannot read ${file}: ${(error as NodeJS.ErrnoException).code ?? error}`
      })
    }
  }
  const certs: Array<Buffer> = []
  const keys: Array<Buffer> = []
  for (const file of certPaths) {
    const cert = read(file, settings.downstreamCertPath.env)
    if (Result.isFailure(cert)) return Result.fail(cert.failure)
    certs.push(cert.success)
  }
  for (const file of keyPaths) {
    const key = read(file, settings.downstreamKeyPath.env)
    if (Result.isFailure(key)) return Result.fail(key.failure)
    keys.push(key.success)
  }
  const invalid = (env: string, what: string) =>
    Result.fail<ConfigProblem>({ path: env, reason: `invalid certificate or key: ${what}` })
  const described: Array<{ readonly text: string; readonly validTo: string }> = []
  for (const [i, pem] of certs.entries()) {
    let cert: X509Certificate
    let key: KeyObject
    try {
      cert = new X509Certificate(pem)
    } catch (error) {
      return invalid(settings.downstreamCertPath.env, `${certPaths[i]}: ${opensslReason(error)}`)
    }
    try {
      key = createPrivateKey(keys[i]!)
    } catch (error) {
      return invalid(settings.downstreamKeyPath.env, `${keyPaths[i]}: ${opensslReason(error)}`)
    }
    // OpenSSL keeps one slot per key type, so an RSA certificate with an ECDSA key is not a
    // "mismatch" to it — it would only fail every handshake. Each pair is checked here instead.
    if (!cert.checkPrivateKey(key)) {
      return invalid(settings.downstreamCertPath.env, `${certPaths[i]} does not match the key in ${keyPaths[i]}`)
    }
    described.push({
      text: `${key.asymmetricKeyType} ${cert.subject.replaceAll("\n", ", ")} until ${cert.validTo}`,
      validTo: cert.validTo
    })
  }
  try {
    return Result.succeed({
      context: tls.createSecureContext({ cert: certs, key: keys, minVersion: "TLSv1.2" }),
      description: described.map((d) => d.text).join("; "),
      expired: described.some((d) => Date.parse(d.validTo) < Date.now())
    })
  } catch (error) {
    return invalid(
      settings.downstreamCertPath.env,
      `${[...certPaths, ...keyPaths].join(", ")}: ${opensslReason(error)}`
    )
  }
}

/**
 * The certificate clients see. A missing or broken pair at start-up is a configuration error; a
 * later reload (SIGHUP, or a change to the files) swaps the context for new connections only, and a
 * broken replacement is logged and ignored so a half-written renewal never takes TLS down.
 */
export class DownstreamTls extends Context.Service<DownstreamTls>()("tidepool/DownstreamTls", {
  make: Effect.gen(function* () {
    const config = yield* AppConfig
    const certPaths = split(config.downstreamCertPath)
    const keyPaths = split(config.downstreamKeyPath)
    if (certPaths.length === 0) {
      return {
        /** The context for a new client connection; undefined: TLS is off and SSLRequest gets `N`. */
        context: (): tls.SecureContext | undefined => undefined,
        /** Re-reads the files; true when the new pair is in use. */
        reload: Effect.succeed(false)
      }
    }
    const initial = loadContext(certPaths, keyPaths)
    if (Result.isFailure(initial)) return yield* new ConfigError({ problems: [initial.failure] })
    let current = initial.success.context
    yield* logLoaded("TLS for clients", initial.success)

    const reload = Effect.suspend(() => {
      const next = loadContext(certPaths, keyPaths)
      if (Result.isFailure(next)) {
        return Effect.as(
          logReloadProblem(`TLS certificate reload failed, keeping the current one: ${next.failure.reason}`),
          false
        )
      }
      current = next.success.context
      return Effect.as(logLoaded("TLS certificate reloaded", next.success), true)
    }).pipe(Effect.withSpan("tls.reload"))

    // SIGHUP and the file watchers call back from outside any fiber: reloads run as fibers of their own.
    const runFork = Effect.runForkWith(yield* Effect.context<never>())
    let timer: NodeJS.Timeout | undefined
    const scheduleReload = () => {
      clearTimeout(timer)
      timer = setTimeout(() => runFork(reload), RELOAD_DEBOUNCE_MS)
      timer.unref()
    }
    const onHangup = () => runFork(reload)
    const unwatched = (dir: string, how: string, error: unknown) =>
      logReloadProblem(
        `${how} ${dir} for certificate changes (${errorCode(error)}): renewals written there are picked up on SIGHUP only`
      )
    const { failures } = yield* Effect.acquireRelease(
      Effect.sync(() => {
        process.on("SIGHUP", onHangup)
        // Directories, not files: renewals usually replace the file (rename, symlink swap), which a
        // watch on the old inode would never report.
        const watched = [...certPaths, ...keyPaths]
        const names = new Set(watched.map((file) => path.basename(file)))
        const watchers: Array<FSWatcher> = []
        const failures: Array<{ readonly dir: string; readonly error: unknown }> = []
        for (const dir of new Set(watched.map((file) => path.dirname(path.resolve(file))))) {
          try {
            const watcher = watch(dir, { persistent: false }, (_event, name) => {
              if (name === null || names.has(name) || name.startsWith("..")) scheduleReload()
            })
            // Node closes a watcher that reports an error: from then on only SIGHUP reloads.
            watcher.on("error", (error) => runFork(unwatched(dir, "stopped watching", error)))
            watchers.push(watcher)
          } catch (error) {
            // The directory went away, or inotify's limits (fs.inotify.max_user_watches) are reached.
            failures.push({ dir, error })
          }
        }
        return { watchers, failures }
      }),
      ({ watchers }) =>
        Effect.sync(() => {
          process.off("SIGHUP", onHangup)
          clearTimeout(timer)
          for (const watcher of watchers) watcher.close()
        })
    )
    yield* Effect.forEach(failures, ({ dir, error }) => unwatched(dir, "cannot watch", error), { discard: true })
    return {
      context: (): tls.SecureContext | undefined => current,
      reload
    }
  })
}) {
  /** The watchers and the SIGHUP handler live as long as the layer. */
  static readonly layer = Layer.effect(this, this.make)
}
