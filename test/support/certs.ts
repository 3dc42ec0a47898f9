/**
 * Test certificates, made with `openssl` into a temporary directory at test time (no private key is
 * ever committed): two CAs, server certificates signed by the first for `localhost` and 127.0.0.1
 * (RSA, and ECDSA signed with SHA-384 so channel binding's hash choice is exercised), and one for
 * `localhost` only (a host-name mismatch when reached as 127.0.0.1).
 */
import { execFile } from "node:child_process"
import * as fs from "node:fs/promises"
import { tmpdir } from "node:os"
import * as path from "node:path"
import { promisify } from "node:util"

const run = promisify(execFile)

export interface CertPair {
  /** Paths of the PEM files. */
  readonly cert: string
  readonly key: string
  /** The certificate's PEM text. */
  readonly certPem: string
}

export interface TestCerts {
  readonly dir: string
  /** The CA that signed every server certificate below. */
  readonly ca: CertPair
  /** A CA that signed nothing here: verifying against it must fail. */
  readonly otherCa: CertPair
  /** For `localhost` and 127.0.0.1, RSA 2048 signed with SHA-256. */
  readonly rsa: CertPair
  /** For `localhost` and 127.0.0.1, P-256 signed with SHA-384. */
  readonly ecdsa: CertPair
  /** For `localhost` only. */
  readonly localhostOnly: CertPair
  /** Another certificate for a reload: RSA for `localhost` and 127.0.0.1, its own serial. */
  readonly renewed: CertPair
  readonly remove: () => Promise<void>
}

const KEY_TYPES = {
  rsa: ["-newkey", "rsa:2048"],
  ec: ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
} as const

const makeCa = async (dir: string, name: string): Promise<CertPair> => {
  const cert = path.join(dir, `${name}.crt`)
  const key = path.join(dir, `${name}.key`)
  await run("openssl", [
    "req",
    "-x509",
    ...KEY_TYPES.rsa,
    "-nodes",
    "-keyout",
    key,
    "-out",
    cert,
    "-days",
    "2",
    "-subj",
    `/CN=Tidepool test ${name}`,
    "-addext",
    "basicConstraints=critical,CA:TRUE",
    "-addext",
    "keyUsage=critical,keyCertSign,cRLSign"
  ])
  return { cert, key, certPem: await fs.readFile(cert, "utf8") }
}

const makeServer = async (
  dir: string,
  name: string,
  ca: CertPair,
  options: { readonly type: keyof typeof KEY_TYPES; readonly san: string; readonly digest: string }
): Promise<CertPair> => {
  const cert = path.join(dir, `${name}.crt`)
  const key = path.join(dir, `${name}.key`)
  await run("openssl", [
    "req",
    "-x509",
    ...KEY_TYPES[options.type],
    "-nodes",
    "-keyout",
    key,
    "-out",
    cert,
    "-CA",
    ca.cert,
    "-CAkey",
    ca.key,
    "-days",
    "2",
    `-${options.digest}`,
    "-subj",
    "/CN=localhost",
    "-addext",
    `subjectAltName=${options.san}`,
    "-addext",
    "basicConstraints=critical,CA:FALSE",
    "-addext",
    "extendedKeyUsage=serverAuth"
  ])
  return { cert, key, certPem: await fs.readFile(cert, "utf8") }
}

export const makeTestCerts = async (): Promise<TestCerts> => {
  const dir = await fs.mkdtemp(path.join(tmpdir(), "tidepool-certs-"))
  try {
    const [ca, otherCa] = await Promise.all([makeCa(dir, "ca"), makeCa(dir, "other-ca")])
    const both = "DNS:localhost,IP:127.0.0.1"
    const [rsa, ecdsa, localhostOnly, renewed] = await Promise.all([
      makeServer(dir, "rsa", ca, { type: "rsa", san: both, digest: "sha256" }),
      makeServer(dir, "ecdsa", ca, { type: "ec", san: both, digest: "sha384" }),
      makeServer(dir, "localhost-only", ca, { type: "rsa", san: "DNS:localhost", digest: "sha256" }),
      makeServer(dir, "renewed", ca, { type: "rsa", san: both, digest: "sha256" })
    ])
    return {
      dir,
      ca,
      otherCa,
      rsa,
      ecdsa,
      localhostOnly,
      renewed,
      remove: () => fs.rm(dir, { recursive: true, force: true })
    }
  } catch (error) {
    await fs.rm(dir, { recursive: true, force: true })
    throw error
  }
}
