import { describe, expect, it } from "@effect/vitest"
import { Effect, Redacted, Result, Schema } from "effect"
import {
  allowListOf,
  isAllowed,
  parseCidr,
  problemsFromParseError,
  strictParseOptions,
  Tenant,
  tenantIssues,
  userMaxClients,
  userPoolSize
} from "../../../src/config/index.ts"

const minimal = {
  external_id: "acme",
  db_host: "127.0.0.1",
  db_port: 5432,
  db_database: "app",
  users: [{ db_user: "app", db_password: "secret" }]
}

const decode = Schema.decodeUnknownEffect(Tenant, strictParseOptions)

const problemsOf = (input: unknown) =>
  decode(input).pipe(
    Effect.flip,
    Effect.map((error) => problemsFromParseError(error, input))
  )

describe("Tenant", () => {
  it.effect("applies every default", () =>
    Effect.gen(function* () {
      const tenant = yield* decode(minimal)
      expect(tenant).toMatchObject({
        require_user: true,
        default_pool_size: 15,
        default_max_clients: 1000,
        client_idle_timeout: 0,
        client_heartbeat_interval: 60,
        allow_list: ["0.0.0.0/0", "::/0"],
        enforce_ssl: false,
        ip_version: "auto",
        upstream_ssl: false,
        feature_flags: {},
        use_jit: false
      })
      const [user] = tenant.users
      expect(user).toMatchObject({
        db_user: "app",
        db_user_alias: "app",
        mode_type: "transaction",
        pool_checkout_timeout: 60000,
        is_manager: false
      })
      expect("pool_size" in user).toBe(false)
      expect(Redacted.value(user.db_password)).toBe("secret")
    })
  )

  it.effect("falls back to the tenant's pool size and client limit", () =>
    Effect.gen(function* () {
      const tenant = yield* decode({
        ...minimal,
        default_pool_size: 7,
        users: [
          { db_user: "a", db_password: "x" },
          { db_user: "b", db_password: "x", pool_size: 3, max_clients: 9 }
        ]
      })
      expect(tenant.users.map((u) => userPoolSize(tenant, u))).toEqual([7, 3])
      expect(tenant.users.map((u) => userMaxClients(tenant, u))).toEqual([1000, 9])
    })
  )

  it.effect("keeps db_password out of printed output", () =>
    Effect.gen(function* () {
      const tenant = yield* decode(minimal)
      expect(JSON.stringify(tenant)).not.toContain("secret")
      expect(String(tenant.users[0].db_password)).not.toContain("secret")
    })
  )

  it.effect("rejects unknown keys in tenants and users", () =>
    Effect.gen(function* () {
      const problems = yield* problemsOf({
        ...minimal,
        default_pool_sise: 3,
        users: [{ db_user: "app", db_password: "secret", poolsize: 3 }]
      })
      expect(problems.map((p) => p.path)).toEqual(["default_pool_sise", "users[0].poolsize"])
      expect(problems[0].reason).toContain('did you mean "default_pool_size"')
      expect(problems[1].reason).toContain('did you mean "pool_size"')
    })
  )

  it.effect("validates field values", () =>
    Effect.gen(function* () {
      const problems = yield* problemsOf({
        ...minimal,
        external_id: "my.tenant",
        db_port: 70000,
        default_pool_size: 0,
        allow_list: ["10.0.0.0/8", "10.0.0.0/33", "nonsense"],
        ip_version: "v5",
        jit_api_url: "ftp://x"
      })
      expect(problems.map((p) => p.path)).toEqual([
        "external_id",
        "db_port",
        "default_pool_size",
        "allow_list[1]",
        "allow_list[2]",
        "ip_version",
        "jit_api_url"
      ])
      expect(problems.find((p) => p.path === "db_port")).toMatchObject({
        reason: "expected an integer between 1 and 65535",
        value: 70000
      })
    })
  )

  it.effect("rejects external_ids that cannot appear in a username", () =>
    Effect.gen(function* () {
      for (const id of ["", "has space", "a.b", "x".repeat(64), "tab\tid"]) {
        const result = yield* Effect.result(decode({ ...minimal, external_id: id }))
        expect(Result.isFailure(result), id).toBe(true)
      }
      yield* decode({ ...minimal, external_id: "x".repeat(63) })
      yield* decode({ ...minimal, external_id: "acme-prod_1" })
    })
  )

  it("a new tenant's external_id is ASCII letters, digits, _ and - only, starting with a letter or digit", () => {
    const idIssues = (id: string) => tenantIssues({ ...minimal, external_id: id })
    for (const id of ["a/b", "a;b", "a'b", 'a"b', "a%2Fb", "a:b", "a?b", "a#b", "-lead", "_lead", "a\\b", "a,b"]) {
      expect(idIssues(id), id).toEqual([
        {
          path: ["external_id"],
          message: "expected ASCII letters, digits, '_' and '-' only, starting with a letter or digit"
        }
      ])
    }
    for (const id of ["x".repeat(63), "acme-prod_1", "ACME_2-x", "7up", "abcdefghijklmnopqrst"]) {
      expect(idIssues(id), id).toEqual([])
    }
    // An id the schema refuses already has its problem; this rule does not repeat it.
    for (const id of ["", "a.b", "has space", "é", "x".repeat(64)]) expect(idIssues(id), id).toEqual([])
  })

  it.effect("a tenant stored under the older id rule still decodes, so an upgrade can load it", () =>
    Effect.gen(function* () {
      const stored = yield* decode({ ...minimal, external_id: "a/b" })
      expect(stored.external_id).toBe("a/b")
    })
  )

  it.effect("require_user: false needs auth_query and exactly one manager", () =>
    Effect.gen(function* () {
      const noQuery = yield* problemsOf({ ...minimal, require_user: false })
      expect(noQuery.map((p) => p.path)).toEqual(["auth_query", "users[0].is_manager"])

      const twoUsers = yield* problemsOf({
        ...minimal,
        require_user: false,
        auth_query: "SELECT rolname, rolpassword FROM pg_authid WHERE rolname=$1",
        users: [
          { db_user: "a", db_password: "x", is_manager: true },
          { db_user: "b", db_password: "x" }
        ]
      })
      expect(twoUsers.map((p) => p.path)).toEqual(["users"])

      yield* decode({
        ...minimal,
        require_user: false,
        auth_query: "SELECT rolname, rolpassword FROM pg_authid WHERE rolname=$1",
        users: [{ db_user: "manager", db_password: "x", is_manager: true }]
      })
    })
  )

  it.effect("use_jit needs a URL; upstream_verify peer may take its CA from GLOBAL_UPSTREAM_CA_PATH", () =>
    Effect.gen(function* () {
      const problems = yield* problemsOf({ ...minimal, upstream_ssl: true, upstream_verify: "peer", use_jit: true })
      expect(problems.map((p) => p.path)).toEqual(["jit_api_url"])
    })
  )

  it.effect("usernames are unique per tenant, by alias", () =>
    Effect.gen(function* () {
      const problems = yield* problemsOf({
        ...minimal,
        users: [
          { db_user: "app", db_password: "x" },
          { db_user: "app", db_password: "x", db_user_alias: "app_ro" },
          { db_user: "other", db_password: "x", db_user_alias: "app" }
        ]
      })
      expect(problems).toHaveLength(1)
      expect(problems[0]).toMatchObject({ path: "users[2]" })
      expect(problems[0].reason).toContain('"app" is already used by users[0]')
    })
  )

  it("parses CIDRs and matches client addresses", () => {
    expect(parseCidr("10.0.0.0/8")).toEqual({ address: "10.0.0.0", prefix: 8, family: "ipv4" })
    expect(parseCidr("::/0")).toEqual({ address: "::", prefix: 0, family: "ipv6" })
    expect(parseCidr("192.168.1.5")).toEqual({ address: "192.168.1.5", prefix: 32, family: "ipv4" })
    expect(parseCidr("10.0.0.0/33")).toBeUndefined()
    expect(parseCidr("10.0.0.0/")).toBeUndefined()
    expect(parseCidr("example.com/8")).toBeUndefined()

    const list = allowListOf(["10.0.0.0/8", "2001:db8::/32"])
    expect(isAllowed(list, "10.1.2.3")).toBe(true)
    expect(isAllowed(list, "::ffff:10.1.2.3")).toBe(true)
    expect(isAllowed(list, "11.1.2.3")).toBe(false)
    expect(isAllowed(list, "2001:db8::1")).toBe(true)
    expect(isAllowed(list, "2001:db9::1")).toBe(false)
  })
})
