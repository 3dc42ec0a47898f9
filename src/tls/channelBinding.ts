import { createHash } from "node:crypto"

/*
 * `tls-server-end-point` channel binding (RFC 5929 §4.1): the hash of the server's DER certificate,
 * with the hash function of the certificate's signature algorithm, except that MD5 and SHA-1 are
 * replaced by SHA-256. This is what libpq and PostgreSQL compute for SCRAM-SHA-256-PLUS.
 */

// Signature algorithm OIDs (DER-encoded content bytes, hex) → hash. RSASSA-PSS and EdDSA carry no
// single hash here; for them no channel binding is offered, as PostgreSQL cannot compute one either.
const HASH_BY_SIGNATURE: ReadonlyMap<string, string> = new Map([
  ["2a864886f70d010104", "sha256"], // md5WithRSAEncryption → SHA-256
  ["2a864886f70d010105", "sha256"], // sha1WithRSAEncryption → SHA-256
  ["2a864886f70d01010e", "sha224"], // sha224WithRSAEncryption
  ["2a864886f70d01010b", "sha256"], // sha256WithRSAEncryption
  ["2a864886f70d01010c", "sha384"], // sha384WithRSAEncryption
  ["2a864886f70d01010d", "sha512"], // sha512WithRSAEncryption
  ["2a8648ce3d0401", "sha256"], // ecdsa-with-SHA1 → SHA-256
  ["2a8648ce3d040301", "sha224"], // ecdsa-with-SHA224
  ["2a8648ce3d040302", "sha256"], // ecdsa-with-SHA256
  ["2a8648ce3d040303", "sha384"], // ecdsa-with-SHA384
  ["2a8648ce3d040304", "sha512"], // ecdsa-with-SHA512
  ["2a8648ce380403", "sha256"], // dsa-with-sha1 → SHA-256
  ["608648016503040302", "sha256"] // dsa-with-sha256
])

/** Reads a DER tag-length header at `at`: where the contents start and end, or undefined. */
const header = (der: Buffer, at: number, tag: number): { readonly start: number; readonly end: number } | undefined => {
  if (at + 2 > der.length || der[at] !== tag) return undefined
  let length = der[at + 1]!
  let start = at + 2
  if (length & 0x80) {
    const bytes = length & 0x7f
    if (bytes === 0 || bytes > 4 || start + bytes > der.length) return undefined
    length = 0
    for (let i = 0; i < bytes; i++) length = length * 256 + der[start + i]!
    start += bytes
  }
  const end = start + length
  return end <= der.length ? { start, end } : undefined
}

const SEQUENCE = 0x30
const OID = 0x06

/** The hash RFC 5929 prescribes for this certificate, or undefined when it names none. */
export const endPointHashAlgorithm = (der: Buffer): string | undefined => {
  // Certificate ::= SEQUENCE { tbsCertificate SEQUENCE, signatureAlgorithm SEQUENCE { OID, … }, … }
  const certificate = header(der, 0, SEQUENCE)
  if (certificate === undefined) return undefined
  const tbs = header(der, certificate.start, SEQUENCE)
  if (tbs === undefined) return undefined
  const algorithm = header(der, tbs.end, SEQUENCE)
  if (algorithm === undefined) return undefined
  const oid = header(der, algorithm.start, OID)
  if (oid === undefined) return undefined
  return HASH_BY_SIGNATURE.get(der.toString("hex", oid.start, oid.end))
}

/** The `tls-server-end-point` binding data for a DER certificate, or undefined when none can be made. */
export const tlsServerEndPoint = (der: Buffer): Buffer | undefined => {
  const algorithm = endPointHashAlgorithm(der)
  return algorithm === undefined ? undefined : createHash(algorithm).update(der).digest()
}
