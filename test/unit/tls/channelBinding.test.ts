import { createHash, X509Certificate } from "node:crypto"
import * as fs from "node:fs/promises"
import { tmpdir } from "node:os"
import * as path from "node:path"
import fc from "fast-check"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { endPointHashAlgorithm, tlsServerEndPoint } from "../../../src/tls/index.ts"
import { run } from "../../support/tools.ts"

let dir: string

/** A self-signed certificate's DER, made by openssl with the given key and digest options. */
const selfSigned = async (name: string, keyArgs: ReadonlyArray<string>, digest: ReadonlyArray<string>) => {
  const out = path.join(dir, `${name}.crt`)
  await run("openssl", [
    "req",
    "-x509",
    ...keyArgs,
    ...digest,
    "-nodes",
    "-keyout",
    path.join(dir, `${name}.key`),
    "-out",
    out,
    "-days",
    "1",
    "-subj",
    `/CN=${name}`
  ])
  return new X509Certificate(await fs.readFile(out)).raw
}

beforeAll(async () => {
  dir = await fs.mkdtemp(path.join(tmpdir(), "tidepool-cb-"))
})

afterAll(async () => {
  await fs.rm(dir, { recursive: true, force: true })
})

const sha = (algorithm: string, der: Buffer) => createHash(algorithm).update(der).digest()

// RFC 5929 §4.1: the certificate's signature hash, except MD5 and SHA-1 become SHA-256.
describe("tls-server-end-point", () => {
  it("hashes with the signature's hash function", async () => {
    const cases = [
      { name: "rsa-sha256", key: ["-newkey", "rsa:2048"], digest: ["-sha256"], hash: "sha256" },
      { name: "rsa-sha512", key: ["-newkey", "rsa:2048"], digest: ["-sha512"], hash: "sha512" },
      {
        name: "ec-sha384",
        key: ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"],
        digest: ["-sha384"],
        hash: "sha384"
      },
      { name: "rsa-sha1", key: ["-newkey", "rsa:2048"], digest: ["-sha1"], hash: "sha256" }
    ]
    for (const c of cases) {
      const der = await selfSigned(c.name, c.key, c.digest)
      expect(endPointHashAlgorithm(der), c.name).toBe(c.hash)
      expect(tlsServerEndPoint(der), c.name).toEqual(sha(c.hash, der))
    }
  })

  it("offers nothing for signatures without a hash of their own (Ed25519) or for garbage", async () => {
    expect(tlsServerEndPoint(await selfSigned("ed25519", ["-newkey", "ed25519"], []))).toBeUndefined()
    for (const garbage of [
      Buffer.alloc(0),
      Buffer.from([0x30]),
      Buffer.from([0x30, 0x84, 0xff, 0xff, 0xff, 0xff]),
      Buffer.from("not a certificate")
    ]) {
      expect(tlsServerEndPoint(garbage)).toBeUndefined()
    }
  })

  it("never throws on any bytes, nor on any truncation of a real certificate", async () => {
    const der = await selfSigned("truncated", ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"], [])
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 200 }), (bytes) => {
        const result = tlsServerEndPoint(Buffer.from(bytes))
        expect(result === undefined || result.length >= 28).toBe(true)
      })
    )
    for (let length = 0; length < der.length; length++) {
      // The signature algorithm sits after the tbsCertificate; cut before it there is none to read.
      tlsServerEndPoint(der.subarray(0, length))
    }
  })
})
