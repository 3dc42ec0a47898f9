/**
 * What a process allocates while something runs, from V8's sampling heap profiler over the
 * inspector (`--inspect`), counting the objects garbage collection has already taken (minor and
 * major): the garbage a login makes, not only what it keeps. Unlike CPU time on a shared machine,
 * this hardly moves from run to run, so it resolves changes to the login path that CPU cannot
 * (docs/login-path.md, "Sixth round"). Node 24's own `fetch` and `WebSocket` speak to the inspector.
 */

export interface Allocations {
  /** Bytes allocated, all told. */
  readonly bytes: number
  /** The same by the file of the allocating function (`effect/dist/internal/effect.js`, `session/ClientSession.js`, …). */
  readonly byFile: ReadonlyMap<string, number>
}

interface ProfileNode {
  readonly callFrame: { readonly url: string }
  readonly selfSize: number
  readonly children: ReadonlyArray<ProfileNode>
}

/** `node_modules/effect/dist/internal/effect.js` → `effect/dist/internal/effect.js`; `…/dist/session/X.js` → `session/X.js`. */
const fileOf = (url: string): string => {
  const dependency = url.lastIndexOf("node_modules/")
  if (dependency >= 0) return url.slice(dependency + "node_modules/".length)
  const own = url.lastIndexOf("/dist/")
  if (own >= 0) return url.slice(own + "/dist/".length)
  return url === "" ? "(native)" : url.replace(/^file:\/\/.*\//, "")
}

/** Samples what the process inspected on `port` allocates while `during` runs (every 1 KiB on average). */
export const sampleAllocations = async (port: number, during: () => Promise<void>): Promise<Allocations> => {
  const targets = (await (await fetch(`http://127.0.0.1:${port}/json/list`)).json()) as Array<{
    readonly webSocketDebuggerUrl: string
  }>
  const socket = new WebSocket(targets[0]!.webSocketDebuggerUrl)
  await new Promise<void>((resolve, reject) => {
    socket.addEventListener("open", () => resolve())
    socket.addEventListener("error", () => reject(new Error(`the inspector on port ${port} did not answer`)))
  })
  let id = 0
  const pending = new Map<number, (result: unknown) => void>()
  socket.addEventListener("message", (event) => {
    const message = JSON.parse(String(event.data)) as { id?: number; result?: unknown }
    if (message.id === undefined) return
    pending.get(message.id)?.(message.result)
    pending.delete(message.id)
  })
  const send = (method: string, params: object = {}) =>
    new Promise<unknown>((resolve) => {
      id++
      pending.set(id, resolve)
      socket.send(JSON.stringify({ id, method, params }))
    })
  try {
    await send("HeapProfiler.enable")
    await send("HeapProfiler.startSampling", {
      samplingInterval: 1024,
      includeObjectsCollectedByMajorGC: true,
      includeObjectsCollectedByMinorGC: true
    })
    await during()
    const { profile } = (await send("HeapProfiler.stopSampling")) as { profile: { head: ProfileNode } }
    const byFile = new Map<string, number>()
    let bytes = 0
    const visit = (node: ProfileNode) => {
      if (node.selfSize > 0) {
        const file = fileOf(node.callFrame.url)
        byFile.set(file, (byFile.get(file) ?? 0) + node.selfSize)
        bytes += node.selfSize
      }
      for (const child of node.children) visit(child)
    }
    visit(profile.head)
    return { bytes, byFile }
  } finally {
    socket.close()
  }
}
