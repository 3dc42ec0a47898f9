import { createHash, createHmac, pbkdf2Sync } from "node:crypto"
import fc from "fast-check"
import { describe, expect, it } from "vitest"
import {
  createScramSecret,
  formatScramSecret,
  parseScramSecret,
  SCRAM_SHA_256,
  SCRAM_SHA_256_PLUS,
  ScramClient,
  ScramError,
  type ScramSecret,
  ScramServer,
  saslprep
} from "../../../src/protocol/index.ts"

// RFC 7677 §3.
const RFC = {
  password: "pencil",
  clientNonce: "rOprNGfwEbeRWgbNEkqO",
  serverNonce: "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
  salt: Buffer.from("W22ZaJ0SNY7soEsUEjb6gQ==", "base64"),
  clientFirst: "n,,n=user,r=rOprNGfwEbeRWgbNEkqO",
  serverFirst: "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
  clientFinal:
    "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
  serverFinal: "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
}

const ok = <A>(result: A | ScramError): A => {
  if (result instanceof ScramError) throw new Error(`unexpected ScramError: ${result.message}`)
  return result
}

const fail = (result: unknown): ScramError => {
  if (!(result instanceof ScramError)) throw new Error(`expected a ScramError, got ${JSON.stringify(result)}`)
  return result
}

/** Runs a whole exchange; returns the server's result of client-final (and the client's check of server-final). */
const exchange = (secret: ScramSecret, client: ScramClient, server = new ScramServer(secret)) => {
  const { serverFirst } = ok(server.handleClientFirst(client.mechanism, Buffer.from(client.clientFirst())))
  const clientFinal = ok(client.handleServerFirst(serverFirst))
  const final = server.handleClientFinal(Buffer.from(clientFinal))
  if (final instanceof ScramError) return { final }
  return { final, verified: client.verifyServerFinal(final.serverFinal) }
}

describe("SCRAM-SHA-256 client", () => {
  it("reproduces the RFC 7677 test vector", () => {
    const client = new ScramClient({ password: RFC.password }, { username: "user", nonce: RFC.clientNonce })
    expect(client.clientFirst()).toBe(RFC.clientFirst)
    expect(client.handleServerFirst(RFC.serverFirst)).toBe(RFC.clientFinal)
    expect(client.verifyServerFinal(RFC.serverFinal)).toBe(true)
    expect(client.keys?.iterations).toBe(4096)
  })

  it("rejects a wrong server signature", () => {
    const client = new ScramClient({ password: RFC.password }, { username: "user", nonce: RFC.clientNonce })
    client.handleServerFirst(RFC.serverFirst)
    expect(fail(client.verifyServerFinal("v=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")).reason).toBe("protocol")
  })

  it("rejects a server nonce that does not extend ours, and server errors", () => {
    const client = new ScramClient({ password: "x" }, { nonce: "abc" })
    expect(fail(client.handleServerFirst("r=xyzdef,s=c2FsdA==,i=4096")).reason).toBe("protocol")
    const same = new ScramClient({ password: "x" }, { nonce: "abc" })
    expect(fail(same.handleServerFirst("r=abc,s=c2FsdA==,i=4096")).reason).toBe("protocol")
    const c = new ScramClient({ password: "x" }, { nonce: "abc" })
    ok(c.handleServerFirst("r=abcdef,s=c2FsdA==,i=1"))
    expect(fail(c.verifyServerFinal("e=invalid-proof")).reason).toBe("password")
  })

  it("refuses iteration counts above maxIterations instead of stalling", () => {
    const client = new ScramClient({ password: "x" }, { nonce: "abc", maxIterations: 10_000 })
    expect(fail(client.handleServerFirst("r=abcdef,s=c2FsdA==,i=2147483647")).message).toContain("iteration")
  })

  it("enforces the message order", () => {
    const client = new ScramClient({ password: "x" })
    expect(fail(client.verifyServerFinal("v=abcd")).reason).toBe("protocol")
  })
})

describe("SCRAM-SHA-256 server", () => {
  const rfcSecret = createScramSecret(RFC.password, RFC.salt, 4096)

  it("reproduces the RFC 7677 test vector", () => {
    const server = new ScramServer(rfcSecret, { nonce: RFC.serverNonce })
    expect(server.mechanisms).toEqual([SCRAM_SHA_256])
    expect(ok(server.handleClientFirst(SCRAM_SHA_256, Buffer.from(RFC.clientFirst)))).toEqual({
      serverFirst: RFC.serverFirst
    })
    const final = ok(server.handleClientFinal(Buffer.from(RFC.clientFinal)))
    expect(final.serverFinal).toBe(RFC.serverFinal)
    // ClientKey = HMAC(SaltedPassword, "Client Key"), computed here independently.
    const salted = pbkdf2Sync(RFC.password, RFC.salt, 4096, 32, "sha256")
    expect(final.clientKey).toEqual(createHmac("sha256", salted).update("Client Key").digest())
  })

  it("accepts the right password and refuses a wrong one with reason password", () => {
    const secret = createScramSecret("correct horse", undefined, 4096)
    const good = exchange(secret, new ScramClient({ password: "correct horse" }))
    expect(good.final).not.toBeInstanceOf(ScramError)
    expect(good.verified).toBe(true)
    const bad = exchange(secret, new ScramClient({ password: "battery staple" }))
    expect(fail(bad.final).reason).toBe("password")
  })

  it("supports SCRAM pass-through: the recovered ClientKey logs in to a second server", () => {
    const secret = createScramSecret("s3cret", undefined, 4096)
    const first = exchange(secret, new ScramClient({ password: "s3cret" }))
    const { clientKey } = ok(first.final)
    // The pooler knows only the verifier (from auth_query) and the recovered key.
    const upstream = exchange(secret, new ScramClient({ clientKey, serverKey: secret.serverKey }))
    expect(upstream.final).not.toBeInstanceOf(ScramError)
    expect(upstream.verified).toBe(true)
    const blind = exchange(secret, new ScramClient({ clientKey }))
    expect(blind.verified).toBe(true)
    // The wrong ServerKey exposes an impostor server.
    const impostor = exchange(secret, new ScramClient({ clientKey, serverKey: Buffer.alloc(32) }))
    expect(fail(impostor.verified).reason).toBe("protocol")
  })

  it("accepts y,, only when channel binding is not offered", () => {
    const secret = createScramSecret("pw", undefined, 4096)
    const plain = new ScramServer(secret)
    expect(ok(plain.handleClientFirst(SCRAM_SHA_256, "y,,n=,r=abc")).serverFirst).toMatch(/^r=abc/)
    const binding = { type: "tls-server-end-point" as const, data: Buffer.alloc(32, 1) }
    const offering = new ScramServer(secret, { channelBinding: binding })
    expect(offering.mechanisms).toEqual([SCRAM_SHA_256_PLUS, SCRAM_SHA_256])
    expect(fail(offering.handleClientFirst(SCRAM_SHA_256, "y,,n=,r=abc")).message).toContain("channel binding")
    expect(ok(new ScramServer(secret, { channelBinding: binding }).handleClientFirst(SCRAM_SHA_256, "n,,n=,r=abc")))
  })

  it("checks tls-server-end-point channel binding data", () => {
    const secret = createScramSecret("pw", undefined, 4096)
    const data = Buffer.alloc(32, 7)
    const gs2 = "p=tls-server-end-point,,"
    const run = (cbind: Buffer) => {
      const server = new ScramServer(secret, { channelBinding: { type: "tls-server-end-point", data } })
      const { serverFirst } = ok(server.handleClientFirst(SCRAM_SHA_256_PLUS, `${gs2}n=,r=abc`))
      const nonce = serverFirst.split(",")[0]!.slice(2)
      // The proof is irrelevant here: channel binding is checked first.
      const c = Buffer.concat([Buffer.from(gs2), cbind]).toString("base64")
      return server.handleClientFinal(`c=${c},r=${nonce},p=${Buffer.alloc(32).toString("base64")}`)
    }
    expect(fail(run(data)).reason).toBe("password")
    expect(fail(run(Buffer.alloc(32, 8))).message).toBe("SCRAM channel binding check failed")
    // -PLUS is refused when not offered, and p= is refused with plain SCRAM-SHA-256.
    const plain = new ScramServer(secret)
    expect(fail(plain.handleClientFirst(SCRAM_SHA_256_PLUS, `${gs2}n=,r=abc`)).reason).toBe("protocol")
    expect(fail(new ScramServer(secret).handleClientFirst(SCRAM_SHA_256, `${gs2}n=,r=abc`)).reason).toBe("protocol")
  })

  it("refuses malformed client messages as protocol errors", () => {
    const secret = createScramSecret("pw", undefined, 4096)
    for (const first of [
      "",
      "x,,n=,r=a",
      "n,a=bob,n=,r=a",
      "n,,m=ext,n=,r=a",
      "n,,r=a",
      "n,,n=u",
      "n,,n=u,r=",
      "n,,n=u,r=a\0"
    ]) {
      expect(fail(new ScramServer(secret).handleClientFirst(SCRAM_SHA_256, first)).reason, first).toBe("protocol")
    }
    expect(fail(new ScramServer(secret).handleClientFirst("SCRAM-SHA-1", "n,,n=,r=a")).reason).toBe("protocol")
    const server = new ScramServer(secret, { nonce: "srv" })
    ok(server.handleClientFirst(SCRAM_SHA_256, "n,,n=,r=cli"))
    expect(fail(server.handleClientFinal("c=biws,r=clisrvX,p=AAAA")).message).toBe("SCRAM nonce mismatch")
    const finals = ["c=biws,r=clisrv", "c=eSws,r=clisrv,p=AAAA", "c=biws,r=clisrv,p=AAAA", "r=clisrv,p=AAAA"]
    for (const final of finals) {
      const s = new ScramServer(secret, { nonce: "srv" })
      ok(s.handleClientFirst(SCRAM_SHA_256, "n,,n=,r=cli"))
      expect(fail(s.handleClientFinal(final)).reason, final).toBe("protocol")
    }
    expect(fail(server.handleClientFinal("anything")).message).toContain("unexpected")
  })

  it("ignores the username and extensions in client-first", () => {
    const secret = createScramSecret("pw", undefined, 4096)
    const client = new ScramClient({ password: "pw" }, { username: "some,=odd name" })
    expect(client.clientFirst()).toContain("n=some=2C=3Dodd name,")
    expect(exchange(secret, client).verified).toBe(true)
    expect(ok(new ScramServer(secret).handleClientFirst(SCRAM_SHA_256, "n,,n=x,r=abc,x=1")))
  })

  it("never throws on garbage, on either side", () => {
    const secret = createScramSecret("pw", Buffer.from("salt"), 16)
    const text = fc.oneof(
      fc.string({ maxLength: 120, unit: "binary" }),
      fc
        .constantFrom("n,,n=,r=", "y,,n=,r=", "p=tls-server-end-point,,n=,r=", "c=biws,r=", "r=", "v=", "e=")
        .chain((p) => fc.string({ maxLength: 80 }).map((s) => p + s))
    )
    fc.assert(
      fc.property(
        fc.constantFrom(SCRAM_SHA_256, SCRAM_SHA_256_PLUS, "x"),
        text,
        text,
        fc.boolean(),
        (mechanism, a, b, binding) => {
          const server = new ScramServer(
            secret,
            binding ? { channelBinding: { type: "tls-server-end-point", data: Buffer.alloc(32) } } : {}
          )
          const first = server.handleClientFirst(mechanism, Buffer.from(a, "latin1"))
          if (!(first instanceof ScramError)) expect(first.serverFirst).toMatch(/^r=/)
          const final = server.handleClientFinal(Buffer.from(b))
          expect(final).toBeInstanceOf(ScramError)
          const client = new ScramClient({ password: "pw" }, { nonce: "n", maxIterations: 64 })
          client.clientFirst()
          const cf = client.handleServerFirst(a)
          if (typeof cf === "string") expect(cf).toMatch(/^c=biws,r=n/)
          const v = client.verifyServerFinal(b)
          expect(v === true || v instanceof ScramError).toBe(true)
        }
      ),
      { numRuns: 2_000 }
    )
  })
})

describe("SCRAM secrets", () => {
  it("derives PostgreSQL's verifier for the RFC 7677 password and salt", () => {
    // The same verifier a PostgreSQL server stores for password 'pencil' with this salt.
    expect(formatScramSecret(createScramSecret("pencil", RFC.salt, 4096))).toBe(
      "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU="
    )
  })

  it("formats in PostgreSQL's layout and parses back", () => {
    const secret = createScramSecret("pw")
    const formatted = formatScramSecret(secret)
    expect(formatted).toMatch(/^SCRAM-SHA-256\$4096:[A-Za-z0-9+/]{22}==\$[A-Za-z0-9+/]{43}=:[A-Za-z0-9+/]{43}=$/)
    expect(parseScramSecret(formatted)).toEqual(secret)
    // StoredKey = H(HMAC(SaltedPassword, "Client Key")), computed here independently.
    const salted = pbkdf2Sync("pw", secret.salt, 4096, 32, "sha256")
    const clientKey = createHmac("sha256", salted).update("Client Key").digest()
    expect(secret.storedKey).toEqual(createHash("sha256").update(clientKey).digest())
  })

  it("parses a verifier with a non-default salt size and iteration count", () => {
    const secret = createScramSecret("pw", Buffer.from("0123456789"), 10)
    expect(parseScramSecret(formatScramSecret(secret))).toEqual(secret)
  })

  it("rejects malformed verifiers", () => {
    const good = formatScramSecret(createScramSecret("pw", undefined, 16))
    const bad = [
      "",
      "md5abcdef",
      good.replace("SCRAM-SHA-256", "SCRAM-SHA-1"),
      good.replace("$16:", "$0:"),
      good.replace("$16:", "$x:"),
      good.slice(0, -4),
      `${good}AAAA`,
      good.replace(/\$[^$]*$/, "$!!!!:!!!!"),
      "SCRAM-SHA-256$4096:$AAAA:AAAA"
    ]
    for (const s of bad) expect(parseScramSecret(s), s).toBeUndefined()
  })
})

describe("saslprep", () => {
  it("leaves ASCII alone", () => {
    expect(saslprep("pencil\u0007")).toBe("pencil\u0007")
  })

  it("maps non-ASCII spaces to space, drops mapped-to-nothing characters, and applies NFKC", () => {
    expect(saslprep("a\u00a0b")).toBe("a b")
    expect(saslprep("I\u00adX")).toBe("IX")
    expect(saslprep("\u2168")).toBe("IX")
    expect(saslprep("\u00aa")).toBe("a")
    expect(saslprep("ﬁ")).toBe("fi")
  })

  it("falls back to the raw password when a prohibited character appears", () => {
    expect(saslprep("é\u0007")).toBe("é\u0007")
    expect(saslprep("é\ue000")).toBe("é\ue000")
    expect(saslprep("é\u200e")).toBe("é\u200e")
  })

  it("applies to key derivation, so equivalent spellings log in", () => {
    const secret = createScramSecret("\u2168", undefined, 16)
    expect(exchange(secret, new ScramClient({ password: "IX" })).verified).toBe(true)
  })
})
