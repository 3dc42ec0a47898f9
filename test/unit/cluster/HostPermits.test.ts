import { describe, expect, it } from "vitest"
import { HostPermits, type LedgerOut } from "../../../src/cluster/index.ts"
import type { LinePermits, PermitHolder } from "../../../src/cluster/StoreRunner.ts"

/**
 * A host's two levels (docs/scale-out.md#several-workers-on-each-of-several-hosts): the supervisor's
 * Ledger shares out among its workers what the store granted the host. The store is simulated by
 * what a runner line would hear (wants, releases) and answer (grants, directives through the holder).
 */
const setup = () => {
  const sent: Array<[number, LedgerOut]> = []
  const store: Array<string> = []
  let holder: PermitHolder | undefined
  const holders: Array<PermitHolder> = []
  const host = new HostPermits(
    (h): LinePermits => {
      holder = h
      holders.push(h)
      return {
        want: (size, n) => store.push(`want ${n} of ${size}`),
        release: (n) => store.push(`release ${n}`),
        opened: () => undefined,
        closed: () => undefined
      }
    },
    (worker, message) => sent.push([worker, message])
  )
  const take = () => sent.splice(0)
  const heard = () => store.splice(0)
  const grants = (messages: Array<[number, LedgerOut]>) =>
    messages.flatMap(([w, m]) => (m.t === "grant" ? [[w, m.n] as const] : []))
  const directives = (messages: Array<[number, LedgerOut]>) =>
    Object.fromEntries(
      messages.flatMap(([w, m]) => (m.t === "directive" ? [[w, { keep: m.keep, press: m.press }]] : []))
    )
  return { host, ledger: host.ledger, store: () => holder!, holders, take, heard, grants, directives }
}

describe("HostPermits", () => {
  it("grants workers only what the store granted the host, and asks the store for the rest", () => {
    const { host, ledger, store, take, heard, grants, directives } = setup()
    ledger.want(0, "p", 10, 3)
    ledger.want(1, "p", 10, 3)
    // Nothing granted yet: no worker gets a permit, and none is told to give one up.
    const out = take()
    expect(grants(out)).toEqual([])
    expect(Object.values(directives(out)).every((d) => d.keep === null || d.keep >= 3)).toBe(true)
    expect(heard()).toEqual(["want 3 of 10", "want 6 of 10"])
    store().grant(4)
    expect(grants(take())).toEqual([
      [0, 3],
      [1, 1]
    ])
    expect(host.grantedTo("p")).toBe(4)
    // The store counts its grant off the host's want (2 left), as the host does: nothing to say.
    expect(heard()).toEqual([])
    store().grant(2)
    expect(grants(take())).toEqual([[1, 2]])
    expect(heard()).toEqual([])
    expect(ledger.total("p")).toBe(6)
  })

  it("gives back at once every permit no worker holds", () => {
    const { host, ledger, store, take, heard } = setup()
    ledger.want(0, "p", 10, 2)
    store().grant(3)
    take()
    // One more than wanted (the want shrank meanwhile): straight back.
    expect(heard()).toEqual(["want 2 of 10", "release 1"])
    ledger.release(0, "p", 1)
    expect(heard()).toEqual(["release 1"])
    expect(host.grantedTo("p")).toBe(1)
  })

  it("a store directive keep k becomes the host's size: workers above their share are told, even if none waits", () => {
    const { host, ledger, store, take, heard, directives } = setup()
    ledger.want(0, "p", 10, 4)
    ledger.want(1, "p", 10, 4)
    store().grant(8)
    take()
    heard()
    store().direct(4, false)
    expect(directives(take())).toEqual({ 0: { keep: 2, press: false }, 1: { keep: 2, press: false } })
    // Workers close servers down to their share; what they give back goes to the store.
    ledger.release(0, "p", 2)
    ledger.release(1, "p", 2)
    expect(heard()).toEqual(["release 2", "release 2"])
    expect(host.grantedTo("p")).toBe(4)
    // Another host waits and this one wants nothing: every worker is pressed.
    store().direct(4, true)
    expect(directives(take())).toEqual({ 0: { keep: null, press: true }, 1: { keep: null, press: true } })
    store().direct(Number.POSITIVE_INFINITY, false)
    expect(directives(take())).toEqual({ 0: { keep: null, press: false }, 1: { keep: null, press: false } })
  })

  it("a dead worker's permits go to a waiting worker of the host first, the rest back to the store", () => {
    const { ledger, store, take, heard, grants } = setup()
    ledger.want(0, "p", 10, 3)
    store().grant(3)
    ledger.want(1, "p", 10, 2)
    take()
    heard()
    ledger.forget(0)
    expect(grants(take())).toEqual([[1, 2]])
    expect(heard()).toEqual(["release 1", "want 0 of 10"])
  })

  it("a pool's record goes once no worker holds, wants or has a server open, and is made anew on re-use", () => {
    const { host, ledger, store, holders, take, heard, grants } = setup()
    const a = { host: "db", port: 5432, pid: 1, secret: "aa" }
    const b = { host: "db", port: 5432, pid: 2, secret: "bb" }
    ledger.want(0, "p", 10, 2)
    store().grant(2)
    host.opened("p", a)
    host.opened("p", b)
    take()
    heard()
    expect(host.keys).toBe(1)
    // The permits come back when the servers' sockets have closed; their close reports may come
    // later over IPC, and must still reach the store's record of backends.
    ledger.release(0, "p", 2)
    expect(heard()).toEqual(["release 2"])
    expect(ledger.has("p")).toBe(false)
    expect(host.keys).toBe(1)
    host.closed("p", a)
    expect(host.keys).toBe(1)
    host.closed("p", b)
    expect(host.keys).toBe(0)
    // Its holder is closed: the runner drops the line, and gives back a grant still on its way.
    expect(holders[0]!.isClosed).toBe(true)
    // A worker's late "want 0" makes no record.
    ledger.want(1, "p", 10, 0)
    expect(host.keys).toBe(0)
    expect(heard()).toEqual([])
    // Re-used: a new record and holder, asking the store afresh, and the grant reaches the worker.
    ledger.want(1, "p", 10, 1)
    expect(holders).toHaveLength(2)
    expect(holders[1]!.isClosed).toBe(false)
    expect(heard()).toEqual(["want 1 of 10"])
    holders[1]!.grant(1)
    expect(grants(take())).toEqual([[1, 1]])
    expect(host.grantedTo("p")).toBe(1)
  })

  it("a key whose record went while the store was granting: the new record takes the grant, gives back the surplus", () => {
    const { host, ledger, holders, take, heard, grants } = setup()
    ledger.want(0, "p", 10, 1)
    // The worker's want ends (its client left) before the store answered: the record goes.
    ledger.want(0, "p", 10, 0)
    expect(heard()).toEqual(["want 1 of 10", "want 0 of 10"])
    expect(host.keys).toBe(0)
    expect(holders[0]!.isClosed).toBe(true)
    // Used again at once: the runner's line (shared by the key's holders) hands the new holder the
    // grant of its transaction under way, more than this one wants: the rest goes straight back.
    ledger.want(1, "p", 10, 2)
    expect(heard()).toEqual(["want 2 of 10"])
    holders[1]!.grant(3)
    expect(grants(take())).toEqual([[1, 2]])
    expect(heard()).toEqual(["release 1"])
    ledger.release(1, "p", 2)
    expect(heard()).toEqual(["release 2"])
    expect(host.keys).toBe(0)
    expect(holders[1]!.isClosed).toBe(true)
  })

  it("a server reusing a closed one's pid, reported before that close, keeps the record until its own close", () => {
    const { host, ledger, store, heard } = setup()
    ledger.want(0, "p", 10, 1)
    ledger.want(1, "p", 10, 1)
    store().grant(2)
    host.opened("p", { host: "db", port: 5432, pid: 7, secret: "aa" })
    ledger.release(0, "p", 1)
    // Worker 1's new server got pid 7 too, and its report overtook worker 0's close.
    host.opened("p", { host: "db", port: 5432, pid: 7, secret: "bb" })
    host.closed("p", { host: "db", port: 5432, pid: 7, secret: "aa" })
    ledger.release(1, "p", 1)
    heard()
    expect(host.keys).toBe(1)
    host.closed("p", { host: "db", port: 5432, pid: 7, secret: "bb" })
    expect(host.keys).toBe(0)
  })
})
