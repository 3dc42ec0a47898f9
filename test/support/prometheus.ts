/** One sample of a Prometheus text exposition. */
export interface Sample {
  readonly name: string
  readonly labels: Readonly<Record<string, string>>
  readonly value: number
}

export interface Exposition {
  readonly types: ReadonlyMap<string, string>
  readonly samples: ReadonlyArray<Sample>
  /** The value of the sample with exactly these labels among those given (undefined: none). */
  value(name: string, labels?: Readonly<Record<string, string>>): number | undefined
}

const SAMPLE = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$/
const LABEL = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(?:,|$)/y

/**
 * A strict parser of the text format (0.0.4): every sample belongs to a family declared by a TYPE line
 * before it (histograms through `_bucket`/`_sum`/`_count`), no family is declared twice, no series
 * repeats, and histogram buckets are cumulative and end with `+Inf` equal to `_count`. Throws otherwise.
 */
export const parseExposition = (text: string): Exposition => {
  if (!text.endsWith("\n")) throw new Error("exposition must end with a newline")
  const types = new Map<string, string>()
  const samples: Array<Sample> = []
  const seen = new Set<string>()
  for (const line of text.slice(0, -1).split("\n")) {
    if (line.startsWith("# HELP ")) continue
    if (line.startsWith("# TYPE ")) {
      const [name, type] = line.slice(7).split(" ")
      if (name === undefined || !["counter", "gauge", "histogram", "summary", "untyped"].includes(type ?? "")) {
        throw new Error(`bad TYPE line: ${line}`)
      }
      if (types.has(name)) throw new Error(`family declared twice: ${name}`)
      types.set(name, type!)
      continue
    }
    const m = SAMPLE.exec(line)
    if (m === null) throw new Error(`bad sample line: ${JSON.stringify(line)}`)
    const [, name, labelText, valueText] = m as unknown as [string, string, string | undefined, string]
    const family = types.has(name) ? name : name.replace(/_(bucket|sum|count)$/, "")
    if (!types.has(family)) throw new Error(`sample of an undeclared family: ${name}`)
    const labels: Record<string, string> = {}
    if (labelText !== undefined && labelText !== "") {
      LABEL.lastIndex = 0
      while (LABEL.lastIndex < labelText.length) {
        const l = LABEL.exec(labelText)
        if (l === null) throw new Error(`bad labels: ${labelText}`)
        labels[l[1]!] = l[2]!.replace(/\\n/g, "\n").replace(/\\(["\\])/g, "$1")
      }
    }
    const value = valueText === "+Inf" ? Infinity : valueText === "-Inf" ? -Infinity : Number(valueText)
    if (Number.isNaN(value) && valueText !== "NaN") throw new Error(`bad value: ${line}`)
    const id = `${name}${JSON.stringify(Object.entries(labels).sort())}`
    if (seen.has(id)) throw new Error(`series repeated: ${id}`)
    seen.add(id)
    samples.push({ name, labels, value })
  }
  // Histogram buckets: cumulative, ending at +Inf = _count.
  for (const [family, type] of types) {
    if (type !== "histogram") continue
    const series = new Map<string, Array<Sample>>()
    for (const s of samples.filter((x) => x.name === `${family}_bucket`)) {
      const { le, ...rest } = s.labels
      const key = JSON.stringify(Object.entries(rest).sort())
      series.set(key, [...(series.get(key) ?? []), s])
    }
    for (const [key, buckets] of series) {
      for (let i = 1; i < buckets.length; i++) {
        if (buckets[i]!.value < buckets[i - 1]!.value) throw new Error(`${family}${key}: buckets not cumulative`)
      }
      const last = buckets[buckets.length - 1]!
      if (last.labels.le !== "+Inf") throw new Error(`${family}${key}: no +Inf bucket`)
      const count = samples.find(
        (x) => x.name === `${family}_count` && JSON.stringify(Object.entries(x.labels).sort()) === key
      )
      if (count?.value !== last.value) throw new Error(`${family}${key}: +Inf bucket differs from _count`)
    }
  }
  return {
    types,
    samples,
    value: (name, labels = {}) => {
      const want = JSON.stringify(Object.entries(labels).sort())
      return samples.find((s) => s.name === name && JSON.stringify(Object.entries(s.labels).sort()) === want)?.value
    }
  }
}
