import { describe, expect, it } from "vitest"
import type { Statement } from "../../../src/session/ClientStatements.ts"
import { Expect, ExpectationQueue } from "../../../src/session/ExpectationQueue.ts"

const statement = (name: string): Statement => ({
  name,
  serverName: `tp_${name}`,
  serverNameZ: Buffer.from(`tp_${name}\0`),
  parse: Buffer.alloc(0),
  bytes: 0,
  parsedAt: 1,
  usedAt: -1,
  resultType: undefined,
  checkedStamp: -1,
  params: undefined
})

const kinds = (queue: ExpectationQueue) => Array.from({ length: queue.size }, (_, i) => queue.at(i).kind)

describe("ExpectationQueue", () => {
  it("gives each request's fields back in order, and an empty queue's head expects nothing", () => {
    const queue = new ExpectationQueue()
    expect(queue.head.kind).toBe(0)
    const s = statement("s")
    const reply = Buffer.from("E")
    queue.pushStatement(Expect.Bind, s)
    queue.pushHidden(Expect.HiddenParse, "tp_x")
    queue.pushReply(Expect.Fail, reply)
    queue.push(Expect.Sync)
    expect(queue.head).toMatchObject({ kind: Expect.Bind, statement: s, serverName: "", reply: undefined })
    queue.shift()
    expect(queue.head).toMatchObject({ kind: Expect.HiddenParse, statement: undefined, serverName: "tp_x" })
    queue.shift()
    expect(queue.head).toMatchObject({ kind: Expect.Fail, statement: undefined, reply })
    queue.shift()
    expect(queue.head.kind).toBe(Expect.Sync)
    expect(queue.shifted).toBe(3)
    expect(queue.nextSeq).toBe(4)
  })

  it("clears a record when it leaves, so a reused record never carries an old request's statement", () => {
    const queue = new ExpectationQueue()
    queue.pushStatement(Expect.Parse, statement("old"))
    const record = queue.head
    queue.shift()
    expect(record).toMatchObject({ kind: 0, statement: undefined, serverName: "", reply: undefined })
    // Once around the ring: the same record comes back, empty but for what the new push sets.
    for (let i = 0; i < 63; i++) {
      queue.push(Expect.Execute)
      queue.shift()
    }
    queue.push(Expect.Sync)
    expect(queue.head).toBe(record)
    expect(queue.head.statement).toBeUndefined()
  })

  it("keeps order across wrap-around and growth beyond its first size", () => {
    const queue = new ExpectationQueue()
    // Start mid-ring so growth has to unwrap.
    for (let i = 0; i < 40; i++) {
      queue.push(Expect.Execute)
      queue.shift()
    }
    const statements = Array.from({ length: 300 }, (_, i) => statement(`s${i}`))
    for (const s of statements) queue.pushStatement(Expect.Describe, s)
    expect(queue.size).toBe(300)
    for (const s of statements) {
      expect(queue.head.statement).toBe(s)
      queue.shift()
    }
    expect(queue.size).toBe(0)
  })

  it("drops the Syncs sent during COPY data up to the CopyEnd, keeping the rest in order", () => {
    const queue = new ExpectationQueue()
    const s = statement("after")
    queue.push(Expect.Execute)
    queue.push(Expect.Sync)
    queue.push(Expect.Sync)
    queue.push(Expect.CopyEnd)
    queue.push(Expect.Sync)
    queue.pushStatement(Expect.Bind, s)
    expect(queue.removeSyncsBeforeCopyEnd()).toBe(2)
    expect(kinds(queue)).toEqual([Expect.Execute, Expect.CopyEnd, Expect.Sync, Expect.Bind])
    expect(queue.at(3).statement).toBe(s)
    // The removed Syncs were never requests: sequence numbers close up behind them.
    expect(queue.nextSeq).toBe(4)
    expect(queue.indexOf(Expect.CopyEnd, 1)).toBe(1)
    expect(queue.indexOf(Expect.Sync, 1)).toBe(2)
  })

  it("drops every Sync behind the head when the client has not ended the COPY yet", () => {
    const queue = new ExpectationQueue()
    queue.push(Expect.Query)
    queue.push(Expect.Sync)
    queue.push(Expect.Execute)
    queue.push(Expect.Sync)
    expect(queue.removeSyncsBeforeCopyEnd()).toBe(2)
    expect(kinds(queue)).toEqual([Expect.Query, Expect.Execute])
    expect(queue.indexOf(Expect.CopyEnd, 1)).toBe(-1)
    expect(new ExpectationQueue().removeSyncsBeforeCopyEnd()).toBe(0)
  })

  it("hands the first Sync's ReadyForQuery to the pooler, and tells made-up replies from requests", () => {
    const queue = new ExpectationQueue()
    queue.pushStatement(Expect.SyntheticParse, statement("a"))
    queue.pushStatement(Expect.SyntheticClose, undefined)
    expect(queue.allSynthetic()).toBe(true)
    queue.push(Expect.Sync)
    expect(queue.allSynthetic()).toBe(false)
    queue.push(Expect.Sync)
    expect(queue.hideFirstSync()).toBe(true)
    expect(kinds(queue)).toEqual([Expect.SyntheticParse, Expect.SyntheticClose, Expect.HiddenSync, Expect.Sync])
  })
})
