import { createPrivateKey, X509Certificate } from "node:crypto"
import { type FSWatcher, readFileSync, watch } from "node:fs"
import * as path from "node:path"
import * as tls from "node:tls"
import { Effect, Either, Runtime } from "effect"
import { AppConfig, ConfigError, type ConfigProblem, settings } from "../config/index.ts"

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

/**
 * Reads the certificate/key pairs into one SecureContext (several pairs: one per key type, so an
 * RSA and an ECDSA certificate can be served side by side and the client's cipher suites choose).
 * Fails with the reason in words, never with key material.
 */
const loadContext = (
  certPaths: ReadonlyArray<string>,
  keyPaths: ReadonlyArray<string>
): Either.Either<Loaded, ConfigProblem> => {
  const read = (file: string, env: string): Either.Either<Buffer, ConfigProblem> => {
    try {
      return Either.right(readFileSync(file))
    } catch (error) {
      return Either.left({
        path: env,
        reason: `cannot read ${file}: ${(error as NodeJS.ErrnoException).code ?? error}`
      })
    }
  }
  const certs: Array<Buffer> = []
  const keys: Array<Buffer> = []
  for (const file of certPaths) {
    const cert = read(file, settings.downstreamCertPath.env)
    if (Either.isLeft(cert)) return Either.left(cert.left)
    certs.push(cert.right)
  }
  for (const file of keyPaths) {
    const key = read(file, settings.downstreamKeyPath.env)
    if (Either.isLeft(key)) return Either.left(key.left)
    keys.push(key.right)
  }
  try {
    // OpenSSL keeps one slot per key type, so an RSA certificate with an ECDSA key is not a
    // "mismatch" to it — it would only fail every handshake. Each pair is checked here instead.
    const described = certs.map((pem, i) => {
      const cert = new X509Certificate(pem)
      const key = createPrivateKey(keys[i]!)
      if (!cert.checkPrivateKey(key)) throw new Error(`${certPaths[i]} does not match the key in ${keyPaths[i]}`)
      return {
        text: `${key.asymmetricKeyType} ${cert.subject.replaceAll("\n", ", ")} until ${cert.validTo}`,
        validTo: cert.validTo
      }
    })
    return Either.right({
      context: tls.createSecureContext({ cert: certs, key: keys, minVersion: "TLSv1.2" }),
      description: described.map((d) => d.text).join("; "),
      expired: described.some((d) => Date.parse(d.validTo) < Date.now())
    })
  } catch (error) {
    // OpenSSL's reason ("key values mismatch", "no start line") names the problem, not the secret.
    const reason = (error as { reason?: string }).reason ?? (error as Error).message
    return Either.left({ path: settings.downstreamCertPath.env, reason: `invalid certificate or key: ${reason}` })
  }
}

/**
 * The certificate clients see. A missing or broken pair at start-up is a configuration error; a
 * later reload (SIGHUP, or a change to the files) swaps the context for new connections only, and a
 * broken replacement is logged and ignored so a half-written renewal never takes TLS down.
 */
export class DownstreamTls extends Effect.Service<DownstreamTls>()("tidepool/DownstreamTls", {
  scoped: Effect.gen(function* () {
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
    if (Either.isLeft(initial)) return yield* new ConfigError({ problems: [initial.left] })
    let current = initial.right.context
    yield* logLoaded("TLS for clients", initial.right)

    const reload = Effect.suspend(() => {
      const next = loadContext(certPaths, keyPaths)
      if (Either.isLeft(next)) {
        return Effect.as(
          Effect.logWarning(`TLS certificate reload failed, keeping the current one: ${next.left.reason}`),
          false
        )
      }
      current = next.right.context
      return Effect.as(logLoaded("TLS certificate reloaded", next.right), true)
    }).pipe(Effect.withSpan("tls.reload"))

    const runFork = Runtime.runFork(yield* Effect.runtime<never>())
    let timer: NodeJS.Timeout | undefined
    const scheduleReload = () => {
      clearTimeout(timer)
      timer = setTimeout(() => runFork(reload), RELOAD_DEBOUNCE_MS)
      timer.unref()
    }
    const onHangup = () => runFork(reload)
    yield* Effect.acquireRelease(
      Effect.sync(() => {
        process.on("SIGHUP", onHangup)
        // Directories, not files: renewals usually replace the file (rename, symlink swap), which a
        // watch on the old inode would never report.
        const watched = [...certPaths, ...keyPaths]
        const names = new Set(watched.map((file) => path.basename(file)))
        const watchers: Array<FSWatcher> = []
        for (const dir of new Set(watched.map((file) => path.dirname(path.resolve(file))))) {
          try {
            const watcher = watch(dir, { persistent: false }, (_event, name) => {
              if (name === null || names.has(name) || name.startsWith("..")) scheduleReload()
            })
            watcher.on("error", () => undefined)
            watchers.push(watcher)
          } catch {
            // No watch (the directory went away, inotify limits): SIGHUP still reloads.
          }
        }
        return watchers
      }),
      (watchers) =>
        Effect.sync(() => {
          process.off("SIGHUP", onHangup)
          clearTimeout(timer)
          for (const watcher of watchers) watcher.close()
        })
    )
    return {
      context: (): tls.SecureContext | undefined => current,
      reload
    }
  })
}) {}
