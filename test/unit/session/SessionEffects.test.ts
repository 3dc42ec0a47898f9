import { describe, expect, it } from "@effect/vitest"
import { LISTENS, PROBE, sessionEffects, UNPIN, unlistenTargets } from "../../../src/session/SessionEffects.ts"

const flags = (sql: string): number => {
  const text = Buffer.from(`${sql}\0`)
  return sessionEffects(text, 0, text.length)
}

describe("sessionEffects", () => {
  it("leaves ordinary queries alone", () => {
    for (const sql of [
      "select 1",
      "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2",
      "insert into t values (1) on conflict (id) do update set x = excluded.x",
      "BEGIN",
      "SELECT abalance FROM pgbench_accounts WHERE aid = 3",
      "select set_config('request.jwt.claims', $1, true), set_config('role', $2, TRUE)",
      "SET LOCAL statement_timeout = '1s'",
      "set transaction isolation level serializable",
      "select pg_advisory_xact_lock(1)",
      "select 'a;b' -- set x = 1\n",
      "select $1::int /* set x */",
      'select "set" from t'
    ]) {
      expect([sql, flags(sql) & PROBE]).toEqual([sql, 0])
    }
  })

  it("flags what may change the session", () => {
    for (const sql of [
      "SET statement_timeout = '50ms'",
      "  set search_path to a, b",
      "begin; SET work_mem = '8MB'; commit",
      "/* c */ RESET ALL",
      "discard all",
      "LISTEN ch",
      "select 1; unlisten *",
      "select set_config('x.y', 'z', false)",
      "select set_config('x.y', $1, $2)",
      "SELECT pg_advisory_lock(1)",
      "select pg_try_advisory_lock_shared(1, 2)",
      "create temp table t (x int)",
      "CREATE TEMPORARY TABLE t AS SELECT 1",
      "select 1 into temp t",
      "declare c cursor with hold for select 1",
      "prepare s as select 1",
      "do $$ begin execute 'prepare s as select 1'; end $$",
      "do $body$ BEGIN SET work_mem = '1MB'; END $body$",
      "select f('set work_mem = 1')",
      // Found in review: temporary objects without TEMP, quoted names, a comment or dollar quote
      // hiding the last argument, and E'' escapes.
      "CREATE TABLE pg_temp.t (x int)",
      "SELECT * INTO pg_temp.t2 FROM t",
      'SELECT "pg_advisory_lock"(42)',
      "SELECT pg_catalog.\"set_config\"('work_mem', '1GB', false)",
      "SELECT set_config('work_mem', '1GB', false --, true\n)",
      "SELECT set_config('app.user', $$'$$, false), ', true)'",
      "SELECT E'\\'\"'; SET work_mem = '1GB'; SELECT '\"'"
    ]) {
      expect([sql, flags(sql) & PROBE]).toEqual([sql, PROBE])
    }
  })

  it("marks listening and unpinning text", () => {
    expect(flags("listen ch") & LISTENS).toBe(LISTENS)
    expect(flags('UNLISTEN "Ch"') & LISTENS).toBe(LISTENS)
    expect(flags("select pg_advisory_unlock(1)") & UNPIN).toBe(UNPIN)
    expect(flags("drop table t") & UNPIN).toBe(UNPIN)
    expect(flags("close c") & UNPIN).toBe(UNPIN)
    expect(flags("select 1") & UNPIN).toBe(0)
  })

  it("reads UNLISTEN targets as PostgreSQL folds them", () => {
    expect(unlistenTargets('UNLISTEN Foo; unlisten "Bar""x"; select 1; unlisten *')).toEqual(["foo", 'Bar"x', "*"])
    expect(unlistenTargets("DISCARD ALL")).toEqual(["*"])
    expect(unlistenTargets("/* x */ UNLISTEN ch")).toEqual(["ch"])
    expect(unlistenTargets("-- c\nUNLISTEN ch")).toEqual(["ch"])
    expect(unlistenTargets("discard plans")).toEqual([])
  })
})
