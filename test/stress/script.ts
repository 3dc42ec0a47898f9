/**
 * Seeded random client scripts for the differential stress harness.
 *
 * A script is generated as a list of *intents* (a transaction with these operations, a pipeline of
 * these extended-protocol units, a COPY, a cancel, …) and compiled into exact wire *steps*. Compiling
 * keeps a small model of the client's session — which named statements exist, whether the current
 * transaction or pipeline has failed — so that it never produces a pattern listed in
 * differences.ts's AVOIDED (where Tidepool is documented to differ from PostgreSQL). fast-check
 * shrinks intents, and compiling again keeps a shrunk script as valid as the original.
 *
 * Every client works on its own tables (`{T}`, `{D}` below, one pair per client and per run), and
 * statements without a table are shared by every client; so what a client observes depends only on
 * its own script, on a direct connection and through Tidepool alike, however the clients interleave.
 */
import fc from "fast-check"
import { serialize } from "pg-protocol"

// ---- wire steps (plain data: printable, replayable) ---------------------------------------------

/**
 * SQL and values may hold `{T}` / `{D}` (the client's tables), `{S0}` / `{S1}` (tables every client
 * shares), `{C}` (its number), `{FILL:n:c}` (c × n).
 */
export type Frame =
  | { readonly t: "Q"; readonly sql: string }
  | { readonly t: "P"; readonly name: string; readonly sql: string }
  | { readonly t: "B"; readonly portal: string; readonly stmt: string; readonly values: ReadonlyArray<string | null> }
  | { readonly t: "D"; readonly what: "S" | "P"; readonly name: string }
  | { readonly t: "E"; readonly portal: string; readonly rows: number }
  | { readonly t: "C"; readonly what: "S" | "P"; readonly name: string }
  | { readonly t: "S" }
  | { readonly t: "H" }
  | { readonly t: "d"; readonly data: string }
  | { readonly t: "c" }
  | { readonly t: "f"; readonly message: string }

export type Act =
  /** Write the frames (cut at the byte fractions `cuts`), then read until `ready` ReadyForQuery. */
  | {
      readonly a: "send"
      readonly frames: ReadonlyArray<Frame>
      readonly cuts: ReadonlyArray<number>
      readonly ready: number
    }
  /** Write frames ending in Flush, then read until a message of one of the types in `until`. */
  | { readonly a: "flush"; readonly frames: ReadonlyArray<Frame>; readonly until: string }
  /**
   * Write `start` (a COPY … FROM STDIN, simple or extended with its Sync), read until CopyInResponse
   * (or ReadyForQuery: the COPY failed before starting); then write `data` and read one ReadyForQuery.
   * With `vanish`, drop the connection after writing `data` instead.
   */
  | {
      readonly a: "copyIn"
      readonly start: ReadonlyArray<Frame>
      readonly data: ReadonlyArray<Frame>
      readonly cuts: ReadonlyArray<number>
      readonly vanish: boolean
    }
  /** Write the frames; once PostgreSQL shows the `marker` query sleeping, cancel it; read `ready` ReadyForQuery. */
  | { readonly a: "cancel"; readonly frames: ReadonlyArray<Frame>; readonly marker: string; readonly ready: number }
  /** Write the first `keep` (a fraction) of the frames' bytes, then drop the connection. */
  | { readonly a: "vanish"; readonly frames: ReadonlyArray<Frame>; readonly keep: number }
  /** Write the frames and Terminate in one go, and close without reading. */
  | { readonly a: "terminate"; readonly frames: ReadonlyArray<Frame> }

export interface Step {
  readonly label: string
  readonly act: Act
  /** A documented difference this step may show (differences.ts). */
  readonly allow?: "stale-statement-heals"
  /** A step on a shared table: the harness runs it at its epoch of that table (see `Gate`). */
  readonly gate?: Gate
}

/**
 * Shared tables (`{S0}`, `{S1}`) go through numbered *epochs*, one per DDL that changes them. A step
 * gated at epoch `epoch` of `table` runs only while the table is in that epoch; the DDL step that ends
 * epoch `epoch` (`ddl`) runs only once every other client's steps of that epoch are done. Both runs
 * (direct and through Tidepool) honour the same gates, so every client meets every shared table in
 * the same state both ways, however the clients interleave.
 */
export interface Gate {
  readonly table: number
  readonly epoch: number
  readonly ddl: boolean
}

export interface ClientScript {
  readonly steps: ReadonlyArray<Step>
}

export interface RenderContext {
  readonly schema: string
  readonly client: number
}

export const substitute = (s: string, ctx: RenderContext): string =>
  s
    .replaceAll("{T}", `${ctx.schema}.t${ctx.client}`)
    .replaceAll("{D}", `${ctx.schema}.d${ctx.client}`)
    .replace(/\{S(\d)\}/g, (_, n: string) => `${ctx.schema}.s${n}`)
    .replaceAll("{C}", String(ctx.client))
    .replace(/\{FILL:(\d+):(.)\}/g, (_, n: string, c: string) => c.repeat(Number(n)))

export const encode = (frames: ReadonlyArray<Frame>, ctx: RenderContext): Buffer =>
  Buffer.concat(frames.map((f) => encodeFrame(f, ctx)))

const encodeFrame = (f: Frame, ctx: RenderContext): Buffer => {
  switch (f.t) {
    case "Q":
      return serialize.query(substitute(f.sql, ctx))
    case "P":
      return serialize.parse({ name: f.name, text: substitute(f.sql, ctx), types: [] })
    case "B":
      return serialize.bind({
        portal: f.portal,
        statement: f.stmt,
        values: f.values.map((v) => (v === null ? null : substitute(v, ctx)))
      })
    case "D":
      return serialize.describe({ type: f.what, name: f.name })
    case "E":
      return serialize.execute({ portal: f.portal, rows: f.rows })
    case "C":
      return serialize.close({ type: f.what, name: f.name })
    case "S":
      return serialize.sync()
    case "H":
      return serialize.flush()
    case "d":
      return serialize.copyData(Buffer.from(substitute(f.data, ctx)))
    case "c":
      return serialize.copyDone()
    case "f":
      return serialize.copyFail(f.message)
  }
}

const short = (s: string) => {
  const filled = s.replace(/\{FILL:(\d+):(.)\}/g, "<$2×$1>")
  return JSON.stringify(filled.length > 100 ? `${filled.slice(0, 100)}…` : filled)
}

const frameText = (f: Frame): string => {
  switch (f.t) {
    case "Q":
      return `Q ${short(f.sql)}`
    case "P":
      return `P ${JSON.stringify(f.name)} ${short(f.sql)}`
    case "B":
      return `B ${JSON.stringify(f.portal)}←${JSON.stringify(f.stmt)} [${f.values.map((v) => (v === null ? "NULL" : short(v))).join(", ")}]`
    case "D":
      return `D ${f.what} ${JSON.stringify(f.name)}`
    case "E":
      return `E ${JSON.stringify(f.portal)}${f.rows > 0 ? ` max ${f.rows}` : ""}`
    case "C":
      return `C ${f.what} ${JSON.stringify(f.name)}`
    case "d":
      return `d ${short(f.data)}`
    case "f":
      return `f ${JSON.stringify(f.message)}`
    default:
      return f.t
  }
}

/** One line per step: what a person reads in a failure report to replay the script by hand. */
export const stepText = (step: Step): string => {
  const act = step.act
  const frames = (fs: ReadonlyArray<Frame>) => fs.map(frameText).join(" · ")
  switch (act.a) {
    case "send":
      return `${step.label}: ${frames(act.frames)}${act.cuts.length > 0 ? ` (written in ${act.cuts.length + 1} pieces)` : ""}`
    case "flush":
      return `${step.label}: ${frames(act.frames)} (then wait for ${[...act.until].join("/")})`
    case "copyIn":
      return `${step.label}: ${frames(act.start)} ⇒ ${frames(act.data)}${act.vanish ? " ⇒ vanish" : ""}`
    case "cancel":
      return `${step.label}: ${frames(act.frames)} ⇒ CancelRequest once sleeping`
    case "vanish":
      return `${step.label}: ${frames(act.frames)} (${Math.round(act.keep * 100)}% of the bytes sent) ⇒ vanish`
    case "terminate":
      return `${step.label}: ${frames(act.frames)} · X`
  }
}

export const gateText = (g: Gate | undefined): string =>
  g === undefined ? "" : g.ddl ? `[s${g.table} epoch ${g.epoch} → ${g.epoch + 1}] ` : `[s${g.table} epoch ${g.epoch}] `

export const scriptText = (script: ClientScript): string =>
  script.steps.map((step, i) => `  ${String(i).padStart(3)} ${gateText(step.gate)}${stepText(step)}`).join("\n")

// ---- statements -----------------------------------------------------------------------------------

type Fails = "no" | "yes" | "maybe"

export interface Statement {
  readonly sql: string
  readonly values: (a: number, b: number) => Array<string>
  readonly fails: (a: number, b: number) => Fails
}

/** Statements for the extended protocol; the first five name no table, so every client shares them. */
export const STATEMENTS: ReadonlyArray<Statement> = [
  { sql: "SELECT $1::int + $2::int AS sum", values: (a, b) => [`${a}`, `${b}`], fails: () => "no" },
  {
    // The division is hidden from the planner (random() is volatile), so it fails at Execute: see AVOIDED.
    sql: "SELECT $1::int / CASE WHEN random() >= 0 THEN $2::int END AS q",
    values: (a, b) => [`${a}`, `${b % 3}`],
    fails: (_, b) => (b % 3 === 0 ? "yes" : "no")
  },
  { sql: "SELECT $1::text || '!' AS shout, length($1::text) AS n", values: (a) => [`w${a}`], fails: () => "no" },
  {
    sql: "SELECT g, g * $1::int AS m FROM generate_series(1, $2::int) g",
    values: (a, b) => [`${a}`, `${1 + (b % 12)}`],
    fails: () => "no"
  },
  // Read under the client's DateStyle: two clients with different settings must not share its plan.
  {
    sql: "SELECT $1::date AS d, extract(month FROM $1::date)::int AS m",
    values: () => ["01/02/2024"],
    fails: () => "no"
  },
  { sql: "SELECT id, v, s FROM {T} WHERE id >= $1::int ORDER BY id", values: (a) => [`${a % 5}`], fails: () => "no" },
  {
    sql: "INSERT INTO {T} (id, v, s) VALUES ($1::int, $2::int, $3::text) ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v, s = EXCLUDED.s",
    values: (a, b) => [`${1 + (a % 20)}`, `${b}`, `s${a}`],
    fails: () => "no"
  },
  {
    sql: "UPDATE {T} SET v = v + $2::int WHERE id = $1::int",
    values: (a, b) => [`${a % 20}`, `${b % 7}`],
    fails: () => "no"
  },
  {
    sql: "INSERT INTO {T} (id, v) VALUES ($1::int, $2::int)",
    values: (a, b) => [`${a % 3 === 0 ? 0 : 300 + (a % 50)}`, `${b}`],
    fails: (a) => (a % 3 === 0 ? "yes" : "maybe")
  },
  {
    sql: "SELECT count(*) AS n, sum(v) AS total, md5(string_agg(coalesce(s, '-'), ',' ORDER BY id)) AS h FROM {T}",
    values: () => [],
    fails: () => "no"
  },
  {
    sql: "SELECT id, length(s) AS len, md5(s) AS h FROM {T} WHERE id = $1::int",
    values: (a) => [`${1 + (a % 20)}`],
    fails: () => "no"
  }
]

const UPSERT = 6
const SERIES = 3

const SHOW_SETTINGS =
  "SELECT current_setting('TimeZone') AS tz, current_setting('DateStyle') AS ds, current_setting('IntervalStyle') AS ist, " +
  "current_setting('application_name') AS app, current_setting('work_mem') AS wm, current_setting('statement_timeout') AS st, " +
  "timestamptz '2024-01-02 03:04:05+00' AS ts, date '2024-03-04' AS d, interval '1 day 02:03:04' AS i"

/**
 * Statements on the shared tables: every client uses the same text, so through Tidepool they share
 * one server-side statement, which DDL by one client can make stale for another.
 */
const SHARED: ReadonlyArray<{
  readonly sql: string
  readonly simple: (a: number) => string
  readonly values: (a: number) => Array<string>
}> = [
  { sql: "SELECT id, x FROM {S} ORDER BY id", simple: () => "SELECT id, x FROM {S} ORDER BY id", values: () => [] },
  {
    sql: "SELECT x, $1::int AS k FROM {S} WHERE id >= $1::int ORDER BY id",
    simple: (a) => `SELECT x, ${a % 3}::int AS k FROM {S} WHERE id >= ${a % 3}::int ORDER BY id`,
    values: (a) => [`${a % 3}`]
  }
]

/**
 * The types a shared table's `x` takes, in order: each DDL that changes it moves to the next, so a
 * type comes back only after all the others (see AVOIDED on A→B→A). Values stay small integers, which
 * every one of them reads and prints alike, so that ALTER … USING x::type always works.
 */
export const SHARED_TYPES: ReadonlyArray<string> = ["integer", "text", "bigint", "numeric", "varchar(20)", "smallint"]

/** Shared tables per run (`{S0}`, `{S1}`), each created at epoch 0 as `(id int PRIMARY KEY, x integer)` with ids 1..3. */
export const SHARED_TABLES = 2

/** Shared-table intents against the 37 of the rest (their weights' sum): about one intent in eight. */
const SHARED_WEIGHT = 5

type SimpleKind = "select" | "upsert" | "update" | "delete" | "agg" | "div0" | "dup" | "empty" | "notice" | "show"

interface SimpleOp {
  readonly op: SimpleKind
  readonly a: number
  readonly b: number
}

const simpleSql = ({ op, a, b }: SimpleOp): [string, Fails] => {
  switch (op) {
    case "select":
      return ["SELECT id, v, s FROM {T} ORDER BY id", "no"]
    case "upsert":
      return [
        `INSERT INTO {T} (id, v, s) VALUES (${1 + (a % 20)}, ${b}, 'q${a}') ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v, s = EXCLUDED.s`,
        "no"
      ]
    case "update":
      return [`UPDATE {T} SET v = v + ${b % 7} WHERE id = ${a % 20}`, "no"]
    case "delete":
      return [`DELETE FROM {T} WHERE id = ${1 + (a % 20)}`, "no"]
    case "agg":
      return ["SELECT count(*), sum(v) FROM {T}", "no"]
    case "div0":
      return [`SELECT ${a} / 0`, "yes"]
    case "dup":
      return [`INSERT INTO {T} (id, v) VALUES (0, ${a})`, "yes"]
    case "empty":
      return ["", "no"]
    case "notice":
      return [`DO $$ BEGIN RAISE NOTICE 'note %', ${a}; END $$`, "no"]
    case "show":
      return [SHOW_SETTINGS, "no"]
  }
}

/** Settings PostgreSQL reports (ParameterStatus), which Tidepool follows per client. */
const REPORTED: ReadonlyArray<readonly [string, ReadonlyArray<string>]> = [
  ["TimeZone", ["UTC", "Asia/Tokyo", "America/New_York", "Europe/Paris"]],
  ["DateStyle", ["ISO, MDY", "ISO, DMY", "SQL, DMY", "Postgres, MDY", "German, DMY"]],
  ["IntervalStyle", ["postgres", "iso_8601", "sql_standard", "postgres_verbose"]],
  ["application_name", ["c{C}-a", "c{C}-b", ""]]
]

/** Settings PostgreSQL does not report: Tidepool follows a client's SETs of them too. */
const UNREPORTED: ReadonlyArray<readonly [string, ReadonlyArray<string>]> = [
  ["work_mem", ["1MB", "2345kB", "64MB"]],
  ["statement_timeout", ["5min", "0", "1h"]]
]

/** Settings a client may SET for its session. */
const SESSION: ReadonlyArray<readonly [string, ReadonlyArray<string>]> = [...REPORTED, ...UNREPORTED]

/** Settings a transaction may SET LOCAL. */
const LOCAL = SESSION

const pick = <A>(xs: ReadonlyArray<A>, n: number): A => xs[n % xs.length]!

// ---- intents ----------------------------------------------------------------------------------------

interface Unit {
  readonly stmt: number
  readonly named: boolean
  /** Second name for the same text, so one text may live under two names. */
  readonly alias: boolean
  readonly describe: "none" | "S" | "P"
  readonly a: number
  readonly b: number
  /** Size of a large third parameter (the upsert's `s`), 0 for none. */
  readonly big: number
}

type TxOp =
  | { readonly k: "simple"; readonly op: SimpleOp }
  | { readonly k: "savepoint" }
  | { readonly k: "rollbackTo" }
  | { readonly k: "release" }
  | { readonly k: "setLocal"; readonly setting: number; readonly value: number; readonly viaFunction: boolean }
  | { readonly k: "unit"; readonly unit: Unit }
  | { readonly k: "portal"; readonly unit: Unit; readonly rows: number }
  | { readonly k: "cursor"; readonly n: number }
  | { readonly k: "temp"; readonly n: number }

export type Ending =
  | "terminate"
  | "terminateInTx"
  | "terminatePipelined"
  | "terminatePinned"
  | "vanishIdle"
  | "vanishInTx"
  | "vanishMidMessage"
  | "vanishMidCopy"

export type Intent =
  | { readonly k: "simple"; readonly op: SimpleOp; readonly cuts: ReadonlyArray<number> }
  | { readonly k: "multi"; readonly ops: ReadonlyArray<SimpleOp> }
  | {
      readonly k: "tx"
      readonly ops: ReadonlyArray<TxOp>
      readonly commit: boolean
      readonly pipelined: boolean
      readonly cuts: ReadonlyArray<number>
    }
  | {
      readonly k: "pipeline"
      readonly units: ReadonlyArray<Unit>
      readonly syncEach: boolean
      readonly cuts: ReadonlyArray<number>
    }
  | { readonly k: "flush"; readonly unit: Unit }
  | { readonly k: "unnamedAcrossSync"; readonly unit: Unit; readonly queryBetween: boolean }
  | { readonly k: "close"; readonly n: number }
  | {
      readonly k: "set"
      readonly setting: number
      readonly value: number
      readonly how: "set" | "reset" | "resetAll" | "function"
    }
  | {
      readonly k: "sqlPrepare"
      readonly extended: boolean
      readonly uses: number
      readonly inTx: boolean
      readonly end: "deallocate" | "deallocateAll" | "discardAll"
    }
  | { readonly k: "discard"; readonly all: boolean }
  | { readonly k: "ddl"; readonly heal: boolean; readonly commit: boolean }
  | {
      readonly k: "copyIn"
      readonly extended: boolean
      readonly inTx: boolean
      readonly rows: number
      readonly wide: boolean
      readonly outcome: "ok" | "fail" | "bad" | "dup"
      readonly pieces: ReadonlyArray<number>
      readonly cuts: ReadonlyArray<number>
    }
  | { readonly k: "copyOut"; readonly extended: boolean; readonly format: "text" | "csv" | "binary" }
  | {
      readonly k: "big"
      readonly dir: "out" | "rows" | "in" | "query"
      readonly size: number
      readonly cuts: ReadonlyArray<number>
    }
  | { readonly k: "cancel"; readonly where: "simple" | "tx" | "extended" }
  | {
      readonly k: "sharedUse"
      readonly table: number
      readonly stmt: number
      readonly how: "named" | "unnamed" | "simple"
      readonly describe: "none" | "S" | "P"
      readonly a: number
      /** After `cached plan must not change result type`: Close and Parse again (as postgres.js does) rather than use it again. */
      readonly reprepare: boolean
      /** Where the use falls among every client's shared-table steps (see `compileRun`). */
      readonly phase: number
    }
  | {
      readonly k: "sharedDdl"
      readonly table: number
      /** `same`: drop and re-create with the same type; `drop`: the table is absent until the next DDL. */
      readonly kind: "alter" | "recreate" | "same" | "drop"
      /** One Query (its statements in one implicit transaction), or BEGIN … COMMIT pipelined. */
      readonly tx: boolean
      readonly phase: number
    }

// ---- compiling intents into steps -------------------------------------------------------------------

type State = "no" | "yes" | "maybe"

const worse = (s: State, f: Fails): State =>
  f === "yes" || s === "yes" ? "yes" : f === "maybe" || s === "maybe" ? "maybe" : "no"

/** A shared table during one epoch; `type` indexes SHARED_TYPES (while absent: the type it last had). */
interface Epoch {
  readonly exists: boolean
  readonly type: number
}

/** How the run's shared-table steps fall into epochs (`compileRun`), as one client's compiler sees it. */
interface SharedPlan {
  /** Per table, its state in each epoch. */
  readonly epochs: ReadonlyArray<ReadonlyArray<Epoch>>
  /** Per table, the statements of the DDL that ends each epoch. */
  readonly transitions: ReadonlyArray<ReadonlyArray<ReadonlyArray<string>>>
  /** This client's shared intents, by index: the epoch a use runs in, or the epoch a DDL ends. */
  readonly at: ReadonlyMap<number, number>
}

const NO_SHARING: SharedPlan = { epochs: [], transitions: [], at: new Map() }

/**
 * Patterns of a Tidepool defect found and not fixed yet, kept out of the scripts unless asked for
 * (`npm run stress -- --features …`; differences.ts lists each). None at present: `stale-reuse` (a
 * client using its named statement on a shared table again after DDL changed the table's type) is
 * generated always since it was fixed.
 */
export type Feature = never

export const FEATURES: ReadonlyArray<Feature> = []

class Compiler {
  constructor(
    private readonly plan: SharedPlan = NO_SHARING,
    /** Kept for the next defect found and not fixed at once (see `Feature`). */
    readonly features: ReadonlySet<Feature> = new Set()
  ) {}

  readonly steps: Array<Step> = []
  /** Named statements on the shared tables: name → the epoch it was prepared in, and whether its 0A000 was seen. */
  private readonly shared = new Map<string, { epoch: number; erred: boolean }>()
  /** Named protocol-level statements: name → statement index, and whether it surely exists. */
  private readonly named = new Map<string, { stmt: number; sure: boolean }>()
  /** `{D}.v`'s type as far as committed DDL goes. */
  private dText = false
  private block = 0
  /** Names of portals, cursors and temporary tables: unique, so that none fails for existing already. */
  private names = 0
  /** Failure state of the explicit transaction (undefined: none open) and of the current Sync segment. */
  private tx: State | undefined = undefined
  private segment: State = "no"
  private savepoints = 0

  compile(intents: ReadonlyArray<Intent>, ending: Ending): ClientScript {
    for (const [i, intent] of intents.entries()) {
      this.block++
      if (intent.k === "sharedUse") this.sharedUse(intent, this.plan.at.get(i))
      else if (intent.k === "sharedDdl") this.sharedDdl(intent, this.plan.at.get(i))
      else this.intent(intent)
    }
    this.block++
    this.end(ending)
    return { steps: this.steps }
  }

  private push(label: string, act: Act, allow?: Step["allow"], gate?: Gate): void {
    this.steps.push({
      label,
      act,
      ...(allow === undefined ? {} : { allow }),
      ...(gate === undefined ? {} : { gate })
    })
  }

  private send(label: string, frames: Array<Frame>, cuts: ReadonlyArray<number> = [], gate?: Gate): void {
    const ready = frames.filter((f) => f.t === "Q" || f.t === "S").length
    this.push(label, { a: "send", frames, cuts, ready }, undefined, gate)
  }

  /** Forgets every named statement (DEALLOCATE ALL, DISCARD ALL). */
  private forgetAll(): void {
    this.named.clear()
    this.shared.clear()
  }

  /**
   * A use of a shared table's statement, alone in its exchange, outside any transaction (the harness
   * may hold the client at its gate, and a client waiting there must hold no server). A client's first
   * use of a named statement comes with its Parse, as drivers do.
   */
  private sharedUse(it: Extract<Intent, { k: "sharedUse" }>, epoch: number | undefined): void {
    if (epoch === undefined) return
    const table = it.table
    const states = this.plan.epochs[table]!
    const now = states[epoch]!
    const gate: Gate = { table, epoch, ddl: false }
    const st = SHARED[it.stmt]!
    const onTable = (sql: string) => sql.replaceAll("{S}", `{S${table}}`)
    const typeText = now.exists ? SHARED_TYPES[now.type]! : "absent"
    if (it.how === "simple") {
      this.send(`shared s${table} (x ${typeText}): simple query`, [{ t: "Q", sql: onTable(st.simple(it.a)) }], [], gate)
      return
    }
    const values = st.values(it.a)
    const name = `sh${table}${it.stmt}`
    let held = it.how === "named" ? this.shared.get(name) : undefined
    if (held !== undefined) {
      const then = states[held.epoch]!
      const stale = now.exists && now.type !== then.type
      const changed = states.slice(held.epoch, epoch + 1).some((s) => s.exists && s.type !== then.type)
      // A→B→A after the client was told 0A000: see AVOIDED. The client prepares it again instead.
      const back = now.exists && !stale && changed && held.erred
      if (back || (stale && held.erred && it.reprepare)) {
        this.shared.delete(name)
        held = undefined
        this.send(`close ${name}${back ? " (its type came back)" : " (type changed)"}`, [
          { t: "C", what: "S", name },
          this.sync()
        ])
      } else if (stale) {
        const use: Array<Frame> = [
          ...(it.describe === "S" && !held.erred ? [{ t: "D", what: "S", name } as const] : []),
          { t: "B", portal: "", stmt: name, values },
          { t: "E", portal: "", rows: 0 },
          this.sync()
        ]
        const label = `shared s${table}: ${name} prepared on x ${SHARED_TYPES[then.type]}, now x ${typeText}`
        if (held.erred)
          this.push(
            `${label}, used again`,
            { a: "send", frames: use, cuts: [], ready: 1 },
            "stale-statement-heals",
            gate
          )
        else this.send(`${label}: 0A000`, use, [], gate)
        held.erred = true
        return
      } else {
        this.send(
          `shared s${table} (x ${typeText}): ${name} again`,
          [
            ...(it.describe === "S" ? [{ t: "D", what: "S", name } as const] : []),
            { t: "B", portal: "", stmt: name, values },
            ...(it.describe === "P" ? [{ t: "D", what: "P", name: "" } as const] : []),
            { t: "E", portal: "", rows: 0 },
            this.sync()
          ],
          [],
          gate
        )
        return
      }
    }
    // A named Parse while the table is absent: see AVOIDED (the unnamed statement instead).
    const stmt = it.how === "named" && now.exists ? name : ""
    if (stmt !== "") this.shared.set(name, { epoch, erred: false })
    this.send(
      `shared s${table} (x ${typeText}): ${stmt === "" ? "unnamed" : `prepare ${name} and use it`}`,
      [
        { t: "P", name: stmt, sql: onTable(st.sql) },
        ...(it.describe === "S" ? [{ t: "D", what: "S", name: stmt } as const] : []),
        { t: "B", portal: "", stmt, values },
        ...(it.describe === "P" ? [{ t: "D", what: "P", name: "" } as const] : []),
        { t: "E", portal: "", rows: 0 },
        this.sync()
      ],
      [],
      gate
    )
  }

  /** The DDL that ends an epoch of a shared table (its statements decided for the whole run by `compileRun`). */
  private sharedDdl(it: Extract<Intent, { k: "sharedDdl" }>, epoch: number | undefined): void {
    if (epoch === undefined) return
    const table = it.table
    const sql = this.plan.transitions[table]![epoch]!.map((q) => q.replaceAll("{S}", `{S${table}}`))
    const next = this.plan.epochs[table]![epoch + 1]!
    const label = `shared s${table} DDL → ${next.exists ? `x ${SHARED_TYPES[next.type]}` : "absent"}`
    const gate: Gate = { table, epoch, ddl: true }
    if (it.tx)
      this.send(
        `${label} (BEGIN … COMMIT in one write)`,
        [{ t: "Q", sql: "BEGIN" }, ...sql.map((q) => ({ t: "Q", sql: q }) as const), { t: "Q", sql: "COMMIT" }],
        [],
        gate
      )
    else this.send(label, [{ t: "Q", sql: sql.join("; ") }], [], gate)
  }

  private txState(): State | undefined {
    return this.tx
  }

  /** Whether the server would run a named Parse now (not skipped, not refused as in a failed transaction). */
  private get clean(): boolean {
    return (this.tx ?? "no") === "no" && this.segment === "no"
  }

  /** Frames for one unit; a named statement is parsed only when the model says it is missing. */
  private unit(u: Unit): Array<Frame> {
    const st = STATEMENTS[u.stmt]!
    const values: Array<string | null> = st.values(u.a, u.b)
    if (u.big > 0 && u.stmt === UPSERT) values[2] = `{FILL:${u.big}:y}`
    const frames: Array<Frame> = []
    let stmt = ""
    const name = `ps${u.stmt}${u.alias ? "b" : ""}`
    const known = this.named.get(name)
    const clean = this.clean
    if (u.named && known?.sure === true) {
      stmt = name
    } else if (u.named && known === undefined && this.clean) {
      frames.push({ t: "P", name, sql: st.sql })
      this.named.set(name, { stmt: u.stmt, sure: true })
      stmt = name
    } else {
      frames.push({ t: "P", name: "", sql: st.sql })
    }
    // Not a named statement's Describe in a failed transaction: see AVOIDED in differences.ts.
    const describe = u.describe === "S" && stmt !== "" && !clean ? "none" : u.describe
    if (describe === "S") frames.push({ t: "D", what: "S", name: stmt })
    frames.push({ t: "B", portal: "", stmt, values })
    if (describe === "P") frames.push({ t: "D", what: "P", name: "" })
    frames.push({ t: "E", portal: "", rows: 0 })
    this.fail(st.fails(u.a, u.b))
    return frames
  }

  /** A failure ends the Sync segment's work, and aborts an explicit transaction. */
  private fail(f: Fails): void {
    this.segment = worse(this.segment, f)
    if (this.tx !== undefined) this.tx = worse(this.tx, f)
  }

  private sync(): Frame {
    this.segment = "no"
    return { t: "S" }
  }

  /** A simple Query's effect on the model (a Query is its own Sync segment). */
  private query(f: Fails): void {
    if (this.tx !== undefined) this.tx = worse(this.tx, f)
  }

  private intent(it: Intent): void {
    const n = this.block
    switch (it.k) {
      case "simple": {
        const [sql, fails] = simpleSql(it.op)
        this.query(fails)
        this.send(`${it.op.op}`, [{ t: "Q", sql }], it.cuts)
        return
      }
      case "multi": {
        const parts = it.ops.map((op) => simpleSql(op)[0]).filter((s) => s !== "")
        this.send("multi-statement query", [{ t: "Q", sql: parts.join("; ") }])
        return
      }
      case "tx":
        this.transaction(it)
        return
      case "pipeline": {
        const frames: Array<Frame> = []
        for (const u of it.units) {
          frames.push(...this.unit(u))
          if (it.syncEach) frames.push(this.sync())
        }
        if (!it.syncEach) frames.push(this.sync())
        this.send(`pipeline of ${it.units.length}${it.syncEach ? ", a Sync each" : ", one Sync"}`, frames, it.cuts)
        return
      }
      case "flush": {
        const frames = this.unit(it.unit)
        frames.push({ t: "H" })
        this.push("batch with Flush", { a: "flush", frames, until: "CEsI" })
        this.send("its Sync", [this.sync()])
        return
      }
      case "unnamedAcrossSync": {
        // The unnamed statement lives on until the next unnamed Parse or simple Query (which destroys it).
        const st = STATEMENTS[it.unit.stmt]!
        this.send("unnamed Parse, Sync", [{ t: "P", name: "", sql: st.sql }, this.sync()])
        if (it.queryBetween) this.send("a simple query", [{ t: "Q", sql: "SELECT 1 AS between" }])
        this.send("Bind of the unnamed statement in a later Sync", [
          { t: "B", portal: "", stmt: "", values: st.values(it.unit.a, it.unit.b) },
          { t: "E", portal: "", rows: 0 },
          this.sync()
        ])
        return
      }
      case "close": {
        const names = [...this.named.keys()]
        if (names.length === 0) return
        const name = pick(names, it.n)
        this.named.delete(name)
        this.send("Close statement", [{ t: "C", what: "S", name }, this.sync()])
        return
      }
      case "set": {
        // Any setting: reported ones are followed from ParameterStatus, the others by asking the
        // server at the transaction's end (docs/session-state.md).
        const [setting, values] = pick(SESSION, it.setting)
        const value = pick(values, it.value)
        const sql =
          it.how === "set"
            ? `SET ${setting} = '${value}'`
            : it.how === "function"
              ? `SELECT set_config('${setting}', '${value}', false)`
              : it.how === "reset"
                ? `RESET ${setting}`
                : "RESET ALL"
        this.send(`session setting (${it.how})`, [{ t: "Q", sql }])
        return
      }
      case "sqlPrepare":
        this.sqlPrepare(it, n)
        return
      case "discard": {
        this.forgetAll()
        this.send(it.all ? "DISCARD ALL" : "DEALLOCATE ALL", [
          { t: "Q", sql: it.all ? "DISCARD ALL" : "DEALLOCATE ALL" }
        ])
        return
      }
      case "ddl":
        this.ddl(it, n)
        return
      case "copyIn":
        this.copyIn(it, n)
        return
      case "copyOut": {
        const sql = `COPY (SELECT id, v, s FROM {T} ORDER BY id) TO STDOUT${it.format === "text" ? "" : ` WITH (FORMAT ${it.format})`}`
        this.send(
          `COPY TO STDOUT (${it.format}${it.extended ? ", extended" : ""})`,
          it.extended
            ? [
                { t: "P", name: "", sql },
                { t: "B", portal: "", stmt: "", values: [] },
                { t: "E", portal: "", rows: 0 },
                this.sync()
              ]
            : [{ t: "Q", sql }]
        )
        return
      }
      case "big":
        this.big(it)
        return
      case "cancel":
        this.cancel(it, n)
        return
      case "sharedUse":
      case "sharedDdl":
        // Compiled by `compile`, which knows their epochs.
        return
    }
  }

  private transaction(it: Extract<Intent, { k: "tx" }>): void {
    const frames: Array<Frame> = []
    const emit = (label: string, fs: Array<Frame>) => {
      if (it.pipelined) frames.push(...fs)
      else this.send(label, fs)
    }
    this.tx = "no"
    this.savepoints = 0
    emit("BEGIN", [{ t: "Q", sql: "BEGIN" }])
    for (const op of it.ops) {
      switch (op.k) {
        case "simple": {
          const [sql, fails] = simpleSql(op.op)
          this.query(fails)
          emit(op.op.op, [{ t: "Q", sql }])
          break
        }
        case "savepoint":
          // A savepoint made in a failed transaction does not exist: the model only counts real ones.
          if (this.txState() === "no") this.savepoints++
          emit("SAVEPOINT", [{ t: "Q", sql: `SAVEPOINT sp${this.savepoints}` }])
          break
        case "rollbackTo":
          // Not after a failure that may or may not have happened: which state it restores is unknown.
          if (this.savepoints > 0 && this.txState() !== "maybe") {
            emit("ROLLBACK TO SAVEPOINT", [{ t: "Q", sql: `ROLLBACK TO SAVEPOINT sp${this.savepoints}` }])
            this.tx = "no"
          }
          break
        case "release":
          if (this.savepoints > 0 && this.txState() === "no") {
            emit("RELEASE SAVEPOINT", [{ t: "Q", sql: `RELEASE SAVEPOINT sp${this.savepoints}` }])
            this.savepoints--
          }
          break
        case "setLocal": {
          const [setting, values] = pick(LOCAL, op.setting)
          const value = pick(values, op.value)
          emit("SET LOCAL", [
            {
              t: "Q",
              sql: op.viaFunction
                ? `SELECT set_config('${setting}', '${value}', true)`
                : `SET LOCAL ${setting} = '${value}'`
            },
            { t: "Q", sql: SHOW_SETTINGS }
          ])
          break
        }
        case "unit": {
          const fs = this.unit(op.unit)
          emit("extended query", [...fs, this.sync()])
          break
        }
        case "portal": {
          // A portal outlives its Sync only inside a transaction: the server must stay with the client.
          const st = STATEMENTS[SERIES]!
          const portal = `cur${++this.names}`
          const start = this.unit({ ...op.unit, stmt: SERIES, describe: "none" }).filter((f) => f.t !== "E")
          const bind = start.findIndex((f) => f.t === "B")
          start[bind] = { ...(start[bind] as Extract<Frame, { t: "B" }>), portal, values: st.values(op.unit.a, 11) }
          emit("portal, first rows", [...start, { t: "E", portal, rows: op.rows }, this.sync()])
          emit("portal, more rows", [{ t: "E", portal, rows: op.rows }, { t: "E", portal, rows: 0 }, this.sync()])
          emit("close portal", [{ t: "C", what: "P", name: portal }, this.sync()])
          break
        }
        case "cursor": {
          const cursor = `c${++this.names}`
          emit("SQL cursor", [
            { t: "Q", sql: `DECLARE ${cursor} CURSOR FOR SELECT g FROM generate_series(1, ${5 + op.n}) g` },
            { t: "Q", sql: `FETCH ${1 + (op.n % 4)} FROM ${cursor}` },
            { t: "Q", sql: `FETCH ALL FROM ${cursor}` },
            { t: "Q", sql: `CLOSE ${cursor}` }
          ])
          break
        }
        case "temp": {
          const table = `tmp${++this.names}`
          emit("temporary table", [
            { t: "Q", sql: `CREATE TEMP TABLE ${table} (x int) ON COMMIT DROP` },
            { t: "Q", sql: `INSERT INTO ${table} SELECT generate_series(1, ${1 + op.n})` },
            { t: "Q", sql: `SELECT count(*), sum(x) FROM ${table}` }
          ])
          break
        }
      }
    }
    emit(it.commit ? "COMMIT" : "ROLLBACK", [{ t: "Q", sql: it.commit ? "COMMIT" : "ROLLBACK" }])
    this.tx = undefined
    if (it.pipelined) this.send(`transaction of ${it.ops.length} in one write`, frames, it.cuts)
  }

  private sqlPrepare(it: Extract<Intent, { k: "sqlPrepare" }>, n: number): void {
    const name = `sq${n}`
    const prepare = `PREPARE ${name}(int) AS SELECT $1 * 2 AS twice, count(*) AS n FROM {T}`
    this.send(
      `SQL PREPARE${it.extended ? " (extended protocol)" : ""}`,
      it.extended
        ? [
            { t: "P", name: "", sql: prepare },
            { t: "B", portal: "", stmt: "", values: [] },
            { t: "E", portal: "", rows: 0 },
            this.sync()
          ]
        : [{ t: "Q", sql: prepare }]
    )
    if (it.inTx) this.send("BEGIN", [{ t: "Q", sql: "BEGIN" }])
    for (let i = 0; i < it.uses; i++) this.send("EXECUTE", [{ t: "Q", sql: `EXECUTE ${name}(${i + n})` }])
    if (it.inTx) this.send("COMMIT", [{ t: "Q", sql: "COMMIT" }])
    if (it.end !== "deallocate") this.forgetAll()
    const sql =
      it.end === "deallocate" ? `DEALLOCATE ${name}` : it.end === "deallocateAll" ? "DEALLOCATE ALL" : "DISCARD ALL"
    this.send(sql.split(" ").slice(0, 2).join(" "), [{ t: "Q", sql }])
  }

  /**
   * DDL that changes the result type of a statement the transaction has just used, then its re-use:
   * PostgreSQL's `cached plan must not change result type` (0A000) on both sides, inside a savepoint.
   * With `heal`, the statement is used once more after COMMIT: PostgreSQL keeps failing, Tidepool has
   * prepared it afresh (a documented difference).
   */
  private ddl(it: Extract<Intent, { k: "ddl" }>, n: number): void {
    const name = `dd${n}`
    const type = this.dText ? "int" : "text"
    const use: Array<Frame> = [
      { t: "B", portal: "", stmt: name, values: [] },
      { t: "E", portal: "", rows: 0 },
      { t: "S" }
    ]
    this.send("prepare a statement on {D}", [{ t: "P", name, sql: "SELECT id, v FROM {D} ORDER BY id" }, { t: "S" }])
    this.send("BEGIN", [{ t: "Q", sql: "BEGIN" }])
    this.send("use it", use)
    this.send(`ALTER {D}.v to ${type}`, [
      { t: "Q", sql: `ALTER TABLE {D} ALTER COLUMN v TYPE ${type} USING v::${type}` }
    ])
    this.send("SAVEPOINT", [{ t: "Q", sql: "SAVEPOINT ddl" }])
    this.send("use it again: result type changed", use)
    this.send("ROLLBACK TO SAVEPOINT", [{ t: "Q", sql: "ROLLBACK TO SAVEPOINT ddl" }])
    this.send(it.commit ? "COMMIT" : "ROLLBACK", [{ t: "Q", sql: it.commit ? "COMMIT" : "ROLLBACK" }])
    if (it.commit) this.dText = !this.dText
    if (it.heal)
      this.push("use it after the transaction", { a: "send", frames: use, cuts: [], ready: 1 }, "stale-statement-heals")
    this.send("close it", [{ t: "C", what: "S", name }, { t: "S" }])
  }

  private copyIn(it: Extract<Intent, { k: "copyIn" }>, n: number): void {
    const lines: Array<string> = []
    for (let j = 0; j < it.rows; j++) {
      const id = it.outcome === "dup" && j === it.rows >> 1 ? 0 : 1000 + n * 100 + j
      const s = it.wide ? `{FILL:${20_000 + j}:w}` : `c${j}`
      lines.push(it.outcome === "bad" && j === it.rows >> 1 ? `x${j}\t${j}\t${s}\n` : `${id}\t${j}\t${s}\n`)
    }
    // Cut the data into CopyData messages anywhere, even inside a row (COPY allows it).
    const data = lines.join("")
    const marks = [...new Set(it.pieces.map((p) => Math.floor(p * data.length)))].sort((x, y) => x - y)
    const frames: Array<Frame> = []
    let from = 0
    for (const mark of [...marks, data.length]) {
      if (mark > from && !splitsFill(data, mark)) {
        frames.push({ t: "d", data: data.slice(from, mark) })
        from = mark
      }
    }
    if (from < data.length) frames.push({ t: "d", data: data.slice(from) })
    frames.push(it.outcome === "fail" ? { t: "f", message: "client gave up" } : { t: "c" })
    const sql = "COPY {T} (id, v, s) FROM STDIN"
    const start: Array<Frame> = it.extended
      ? [
          { t: "P", name: "", sql },
          { t: "B", portal: "", stmt: "", values: [] },
          { t: "E", portal: "", rows: 0 },
          { t: "S" }
        ]
      : [{ t: "Q", sql }]
    if (it.extended) frames.push({ t: "S" })
    if (it.inTx) this.send("BEGIN", [{ t: "Q", sql: "BEGIN" }])
    this.push(`COPY FROM STDIN, ${it.rows} rows (${it.outcome}${it.extended ? ", extended" : ""})`, {
      a: "copyIn",
      start,
      data: frames,
      cuts: it.cuts,
      vanish: false
    })
    if (it.inTx) this.send("COMMIT", [{ t: "Q", sql: "COMMIT" }])
  }

  private big(it: Extract<Intent, { k: "big" }>): void {
    switch (it.dir) {
      case "out":
        this.send(
          `one ${it.size}-byte value out`,
          [{ t: "Q", sql: `SELECT repeat('x', ${it.size}) AS big, ${it.size} AS n` }],
          it.cuts
        )
        return
      case "rows":
        this.send("many wide rows out", [
          {
            t: "Q",
            sql: `SELECT g, repeat(md5(g::text), ${Math.ceil(it.size / 3200)}) AS w FROM generate_series(1, 100) g`
          }
        ])
        return
      case "in": {
        const frames = this.unit({
          stmt: UPSERT,
          named: true,
          alias: false,
          describe: "none",
          a: it.size,
          b: 1,
          big: it.size
        })
        frames.push(this.sync())
        frames.push(...this.unit({ stmt: 10, named: false, alias: false, describe: "none", a: it.size, b: 0, big: 0 }))
        frames.push(this.sync())
        this.send(`one ${it.size}-byte parameter in, its digest out`, frames, it.cuts)
        return
      }
      case "query":
        this.send(
          `a ${it.size}-byte query`,
          [
            {
              t: "Q",
              sql: `INSERT INTO {T} (id, v, s) VALUES (${1 + (it.size % 20)}, 7, '{FILL:${it.size}:q}') ON CONFLICT (id) DO UPDATE SET s = EXCLUDED.s RETURNING id, length(s)`
            }
          ],
          it.cuts
        )
        return
    }
  }

  private cancel(it: Extract<Intent, { k: "cancel" }>, n: number): void {
    const marker = `stress-cancel-{C}-${n}`
    const sql = `SELECT pg_sleep(60) /* ${marker} */`
    if (it.where === "tx") this.send("BEGIN", [{ t: "Q", sql: "BEGIN" }])
    const frames: Array<Frame> =
      it.where === "extended"
        ? [
            { t: "P", name: "", sql },
            { t: "B", portal: "", stmt: "", values: [] },
            { t: "E", portal: "", rows: 0 },
            { t: "S" }
          ]
        : [{ t: "Q", sql }]
    this.push(`cancel a running query (${it.where})`, { a: "cancel", frames, marker, ready: 1 })
    if (it.where === "tx") {
      this.send("after the cancel, still in the failed transaction", [{ t: "Q", sql: "SELECT 1" }])
      this.send("ROLLBACK", [{ t: "Q", sql: "ROLLBACK" }])
    }
  }

  private end(ending: Ending): void {
    const upsert: Frame = {
      t: "Q",
      sql: "INSERT INTO {T} (id, v, s) VALUES (99, 99, 'last') ON CONFLICT (id) DO UPDATE SET v = {T}.v + 1"
    }
    switch (ending) {
      case "terminate":
        this.push("Terminate", { a: "terminate", frames: [] })
        return
      case "terminateInTx":
        this.send("BEGIN", [{ t: "Q", sql: "BEGIN" }])
        this.send("write", [upsert])
        this.push("Terminate mid-transaction", { a: "terminate", frames: [] })
        return
      case "terminatePipelined":
        this.push("write and Terminate without waiting", { a: "terminate", frames: [upsert] })
        return
      case "terminatePinned":
        // The client leaves pinned by a SQL-level statement: its server must not serve anyone else.
        this.send("SQL PREPARE, kept", [{ t: "Q", sql: "PREPARE kept(int) AS SELECT $1 + 1 AS next" }])
        this.send("EXECUTE", [{ t: "Q", sql: "EXECUTE kept(41)" }])
        this.push("Terminate while pinned", { a: "terminate", frames: [] })
        return
      case "vanishIdle":
        this.push("vanish", { a: "vanish", frames: [], keep: 0 })
        return
      case "vanishInTx":
        this.send("BEGIN", [{ t: "Q", sql: "BEGIN" }])
        this.send("write", [upsert])
        this.push("vanish mid-transaction", { a: "vanish", frames: [], keep: 0 })
        return
      case "vanishMidMessage":
        this.push("vanish mid-message", {
          a: "vanish",
          frames: [{ t: "Q", sql: "INSERT INTO {T} (id, v, s) VALUES (98, 98, '{FILL:300000:m}')" }],
          keep: 0.5
        })
        return
      case "vanishMidCopy":
        this.send("BEGIN", [{ t: "Q", sql: "BEGIN" }])
        this.push("vanish mid-COPY", {
          a: "copyIn",
          start: [{ t: "Q", sql: "COPY {T} (id, v, s) FROM STDIN" }],
          data: [{ t: "d", data: "97\t97\tcopied\n" }],
          cuts: [],
          vanish: true
        })
        return
    }
  }
}

/** Whether cutting `data` at `at` would split a `{FILL:…}` token (the cut must fall between tokens). */
const splitsFill = (data: string, at: number): boolean => {
  const open = data.lastIndexOf("{FILL:", at - 1)
  return open >= 0 && data.indexOf("}", open) >= at
}

export const compile = (intents: ReadonlyArray<Intent>, ending: Ending): ClientScript =>
  new Compiler().compile(intents, ending)

export interface ClientIntents {
  readonly intents: ReadonlyArray<Intent>
  readonly ending: Ending
}

const sharedCreate = (type: number, transition: number): Array<string> => {
  const t = SHARED_TYPES[type]!
  return [
    `CREATE TABLE {S} (id int PRIMARY KEY, x ${t})`,
    `INSERT INTO {S} SELECT g, (g * ${transition + 2})::${t} FROM generate_series(1, 3) g`
  ]
}

/**
 * Compiles every client's script of one run. The shared-table intents of all clients are put in one
 * order (by phase; within a client, its phases are taken in ascending order along its script, so a
 * client's own steps are in order): a DDL ends the current epoch of its table, a use falls in the
 * epoch current at its place. Waiting only ever goes towards earlier places in that order, and a
 * client waits only between exchanges, holding no server, so the gates cannot deadlock.
 */
export const compileRun = (
  clients: ReadonlyArray<ClientIntents>,
  features: ReadonlySet<Feature> = new Set()
): Array<ClientScript> => {
  type Shared = Extract<Intent, { k: "sharedUse" | "sharedDdl" }>
  const items: Array<{ client: number; index: number; phase: number; intent: Shared }> = []
  clients.forEach(({ intents }, client) => {
    const mine = intents.flatMap((intent, index) =>
      intent.k === "sharedUse" || intent.k === "sharedDdl" ? [{ index, intent }] : []
    )
    const phases = mine.map((m) => m.intent.phase).sort((x, y) => x - y)
    for (const [n, m] of mine.entries()) items.push({ client, index: m.index, phase: phases[n]!, intent: m.intent })
  })
  items.sort((x, y) => x.phase - y.phase || x.client - y.client || x.index - y.index)
  const epochs: Array<Array<Epoch>> = Array.from({ length: SHARED_TABLES }, () => [{ exists: true, type: 0 }])
  const transitions: Array<Array<Array<string>>> = Array.from({ length: SHARED_TABLES }, () => [])
  const at = clients.map(() => new Map<number, number>())
  for (const item of items) {
    const table = item.intent.table
    const list = epochs[table]!
    const epoch = list.length - 1
    at[item.client]!.set(item.index, epoch)
    if (item.intent.k !== "sharedDdl") continue
    const from = list[epoch]!
    const next = (from.type + 1) % SHARED_TYPES.length
    const kind = item.intent.kind
    if (!from.exists) {
      const type = kind === "same" ? from.type : next
      list.push({ exists: true, type })
      transitions[table]!.push(sharedCreate(type, epoch))
    } else if (kind === "drop") {
      list.push({ exists: false, type: from.type })
      transitions[table]!.push(["DROP TABLE {S}"])
    } else if (kind === "alter") {
      const t = SHARED_TYPES[next]!
      list.push({ exists: true, type: next })
      transitions[table]!.push([`ALTER TABLE {S} ALTER COLUMN x TYPE ${t} USING x::${t}`])
    } else {
      const type = kind === "same" ? from.type : next
      list.push({ exists: true, type })
      transitions[table]!.push(["DROP TABLE {S}", ...sharedCreate(type, epoch)])
    }
  }
  return clients.map(({ intents, ending }, client) =>
    new Compiler({ epochs, transitions, at: at[client]! }, features).compile(intents, ending)
  )
}

// ---- arbitraries ------------------------------------------------------------------------------------

const small = fc.nat({ max: 1000 })
const cuts = fc.oneof(
  { weight: 3, arbitrary: fc.constant([] as Array<number>) },
  { weight: 1, arbitrary: fc.array(fc.double({ min: 0.001, max: 0.999, noNaN: true }), { minLength: 1, maxLength: 4 }) }
)

const simpleOp: fc.Arbitrary<SimpleOp> = fc.record({
  op: fc.constantFrom<SimpleKind>(
    "select",
    "upsert",
    "upsert",
    "update",
    "delete",
    "agg",
    "div0",
    "dup",
    "empty",
    "notice",
    "show"
  ),
  a: small,
  b: small
})

const unit: fc.Arbitrary<Unit> = fc.record({
  stmt: fc.nat({ max: STATEMENTS.length - 1 }),
  named: fc.boolean(),
  alias: fc.nat({ max: 3 }).map((n) => n === 0),
  describe: fc.constantFrom<Unit["describe"]>("none", "none", "S", "P"),
  a: small,
  b: small,
  big: fc.constant(0)
})

const txOp: fc.Arbitrary<TxOp> = fc.oneof(
  { weight: 6, arbitrary: simpleOp.map((op) => ({ k: "simple" as const, op })) },
  { weight: 2, arbitrary: fc.constant({ k: "savepoint" as const }) },
  { weight: 2, arbitrary: fc.constant({ k: "rollbackTo" as const }) },
  { weight: 1, arbitrary: fc.constant({ k: "release" as const }) },
  {
    weight: 2,
    arbitrary: fc.record({
      k: fc.constant("setLocal" as const),
      setting: small,
      value: small,
      viaFunction: fc.boolean()
    })
  },
  { weight: 5, arbitrary: unit.map((u) => ({ k: "unit" as const, unit: u })) },
  {
    weight: 1,
    arbitrary: fc.record({ k: fc.constant("portal" as const), unit, rows: fc.integer({ min: 1, max: 4 }) })
  },
  { weight: 1, arbitrary: fc.record({ k: fc.constant("cursor" as const), n: fc.nat({ max: 10 }) }) },
  { weight: 1, arbitrary: fc.record({ k: fc.constant("temp" as const), n: fc.nat({ max: 10 }) }) }
)

const intent: fc.Arbitrary<Intent> = fc.oneof(
  { weight: 6, arbitrary: fc.record({ k: fc.constant("simple" as const), op: simpleOp, cuts }) },
  {
    weight: 2,
    arbitrary: fc.record({
      k: fc.constant("multi" as const),
      ops: fc.array(simpleOp, { minLength: 2, maxLength: 3 })
    })
  },
  {
    weight: 8,
    arbitrary: fc.record({
      k: fc.constant("tx" as const),
      ops: fc.array(txOp, { minLength: 1, maxLength: 7 }),
      commit: fc.boolean(),
      pipelined: fc.boolean(),
      cuts
    })
  },
  {
    weight: 6,
    arbitrary: fc.record({
      k: fc.constant("pipeline" as const),
      units: fc.array(unit, { minLength: 1, maxLength: 5 }),
      syncEach: fc.boolean(),
      cuts
    })
  },
  { weight: 2, arbitrary: fc.record({ k: fc.constant("flush" as const), unit }) },
  {
    weight: 2,
    arbitrary: fc.record({ k: fc.constant("unnamedAcrossSync" as const), unit, queryBetween: fc.boolean() })
  },
  { weight: 1, arbitrary: fc.record({ k: fc.constant("close" as const), n: small }) },
  {
    weight: 2,
    arbitrary: fc.record({
      k: fc.constant("set" as const),
      setting: small,
      value: small,
      how: fc.constantFrom("set" as const, "set" as const, "function" as const, "reset" as const, "resetAll" as const)
    })
  },
  {
    weight: 1,
    arbitrary: fc.record({
      k: fc.constant("sqlPrepare" as const),
      extended: fc.boolean(),
      uses: fc.integer({ min: 1, max: 3 }),
      inTx: fc.boolean(),
      end: fc.constantFrom(
        "deallocate" as const,
        "deallocate" as const,
        "deallocateAll" as const,
        "discardAll" as const
      )
    })
  },
  { weight: 1, arbitrary: fc.record({ k: fc.constant("discard" as const), all: fc.boolean() }) },
  { weight: 1, arbitrary: fc.record({ k: fc.constant("ddl" as const), heal: fc.boolean(), commit: fc.boolean() }) },
  {
    weight: 2,
    arbitrary: fc.record({
      k: fc.constant("copyIn" as const),
      extended: fc.boolean(),
      inTx: fc.boolean(),
      rows: fc.integer({ min: 1, max: 40 }),
      wide: fc.nat({ max: 3 }).map((n) => n === 0),
      outcome: fc.constantFrom(
        "ok" as const,
        "ok" as const,
        "ok" as const,
        "fail" as const,
        "bad" as const,
        "dup" as const
      ),
      pieces: fc.array(fc.double({ min: 0, max: 1, noNaN: true }), { maxLength: 5 }),
      cuts
    })
  },
  {
    weight: 1,
    arbitrary: fc.record({
      k: fc.constant("copyOut" as const),
      extended: fc.boolean(),
      format: fc.constantFrom("text" as const, "csv" as const, "binary" as const)
    })
  },
  {
    weight: 1,
    arbitrary: fc.record({
      k: fc.constant("big" as const),
      dir: fc.constantFrom("out" as const, "rows" as const, "in" as const, "query" as const),
      size: fc.integer({ min: 50_000, max: 2_000_000 }),
      cuts
    })
  },
  {
    weight: 1,
    arbitrary: fc.record({
      k: fc.constant("cancel" as const),
      where: fc.constantFrom("simple" as const, "tx" as const, "extended" as const)
    })
  }
)

const sharedIntent: fc.Arbitrary<Intent> = fc.oneof(
  {
    weight: 4,
    arbitrary: fc.record({
      k: fc.constant("sharedUse" as const),
      table: fc.nat({ max: SHARED_TABLES - 1 }),
      // Mostly one text per table, named: the more clients share a statement, the more meet its DDL.
      stmt: fc.constantFrom(0, 0, 0, 1),
      how: fc.constantFrom("named" as const, "named" as const, "named" as const, "unnamed" as const, "simple" as const),
      describe: fc.constantFrom("none" as const, "none" as const, "S" as const, "P" as const),
      a: small,
      reprepare: fc.boolean(),
      phase: fc.nat({ max: 999 })
    })
  },
  {
    weight: 1,
    arbitrary: fc.record({
      k: fc.constant("sharedDdl" as const),
      table: fc.nat({ max: SHARED_TABLES - 1 }),
      kind: fc.constantFrom("alter" as const, "alter" as const, "recreate" as const, "same" as const, "drop" as const),
      tx: fc.boolean(),
      phase: fc.nat({ max: 999 })
    })
  }
)

const ending: fc.Arbitrary<Ending> = fc.constantFrom<Ending>(
  "terminate",
  "terminate",
  "terminate",
  "terminateInTx",
  "terminatePipelined",
  "terminatePinned",
  "vanishIdle",
  "vanishInTx",
  "vanishMidMessage",
  "vanishMidCopy"
)

/** One client's intents: `length` (on average) and an ending. */
const clientIntents = (length: number): fc.Arbitrary<ClientIntents> =>
  fc.record({
    intents: fc.array(fc.oneof({ weight: 37, arbitrary: intent }, { weight: SHARED_WEIGHT, arbitrary: sharedIntent }), {
      minLength: Math.ceil(length / 2),
      maxLength: Math.ceil((length * 3) / 2),
      size: "max"
    }),
    ending
  })

/** One run's scripts, `clients` of them, compiled together (their shared tables' epochs: `compileRun`). */
export const runScripts = (
  clients: number,
  length: number,
  features: ReadonlySet<Feature> = new Set()
): fc.Arbitrary<Array<ClientScript>> =>
  fc
    .array(clientIntents(length), { minLength: clients, maxLength: clients })
    .map((intents) => compileRun(intents, features))
