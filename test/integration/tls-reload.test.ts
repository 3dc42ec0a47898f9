import * as fs from "node:fs/promises"
import * as path from "node:path"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { makeTestCerts, type TestCerts } from "../support/certs.ts"
import { type RunningTidepool, startTidepool } from "../support/tidepool.ts"

let certs: TestCerts

beforeAll(async () => {
  certs = await makeTestCerts()
})

afterAll(async () => {
  await certs?.remove()
})

const withTidepool = async (cert: string, key: string, body: (tidepool: RunningTidepool) => Promise<void>) => {
  const tidepool = await startTidepool({
    tenants: [],
    captureLogs: true,
    config: { downstreamCertPath: cert, downstreamKeyPath: key }
  })
  try {
    await body(tidepool)
  } finally {
    await tidepool.stop()
  }
}

const coded = (tidepool: RunningTidepool) => tidepool.logs.filter((l) => l.code === "ETLSRELOAD")

describe("certificate reload problems are logged with ETLSRELOAD", () => {
  it("a reload that cannot use the new files names the file", async () => {
    const dir = await fs.mkdtemp(path.join(certs.dir, "broken-"))
    const cert = path.join(dir, "server.crt")
    const key = path.join(dir, "server.key")
    await fs.copyFile(certs.rsa.cert, cert)
    await fs.copyFile(certs.rsa.key, key)
    await withTidepool(cert, key, async (tidepool) => {
      expect(coded(tidepool)).toEqual([])
      await fs.writeFile(key, "not a key")
      // The directory watch reloads on its own; SIGHUP as well, in case the watch is slow to report.
      process.emit("SIGHUP", "SIGHUP")
      await expect.poll(() => coded(tidepool).length, { timeout: 10_000 }).toBeGreaterThan(0)
      expect(coded(tidepool)[0]).toEqual({
        level: "WARN",
        code: "ETLSRELOAD",
        message: `TLS certificate reload failed, keeping the current one: invalid certificate or key: ${key}: unsupported`
      })
    })
  })

  it("a directory that cannot be watched is logged at start, and SIGHUP still reloads", async () => {
    // The key is reached through a symlink and `..`: the kernel resolves it to real/x/, while the
    // directory named by the path itself, <dir>/x, does not exist, so it cannot be watched.
    const dir = await fs.mkdtemp(path.join(certs.dir, "unwatchable-"))
    await fs.mkdir(path.join(dir, "real", "sub"), { recursive: true })
    await fs.mkdir(path.join(dir, "real", "x"))
    await fs.symlink(path.join(dir, "real", "sub"), path.join(dir, "link"))
    await fs.copyFile(certs.rsa.cert, path.join(dir, "server.crt"))
    await fs.copyFile(certs.rsa.key, path.join(dir, "real", "x", "server.key"))
    // Not path.join, which would resolve the `..` before the kernel sees the symlink.
    const key = `${dir}/link/../x/server.key`
    await withTidepool(path.join(dir, "server.crt"), key, async (tidepool) => {
      expect(coded(tidepool)).toEqual([
        {
          level: "WARN",
          code: "ETLSRELOAD",
          message: `cannot watch ${path.join(dir, "x")} for certificate changes (ENOENT): renewals written there are picked up on SIGHUP only`
        }
      ])
      const reloads = () => tidepool.logs.filter((l) => l.message.startsWith("TLS certificate reloaded")).length
      process.emit("SIGHUP", "SIGHUP")
      await expect.poll(reloads, { timeout: 10_000 }).toBe(1)
    })
  })
})
