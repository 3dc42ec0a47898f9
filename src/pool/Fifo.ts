/**
 * A first-in first-out queue for the pool's waiting checkouts. `Array.prototype.shift` moves every
 * element left (or runs into V8's runtime to trim the array's start) on each call, and a pool with a
 * thousand clients queued shifts once per transaction; here `shift` only advances a head index, and
 * the consumed prefix is dropped in one move once it is at least half the array.
 */
export class Fifo<T> {
  private items: Array<T | undefined> = []
  private head = 0

  get length(): number {
    return this.items.length - this.head
  }

  push(item: T): void {
    this.items.push(item)
  }

  /** The first item, left in place. */
  peek(): T | undefined {
    return this.head < this.items.length ? this.items[this.head] : undefined
  }

  shift(): T | undefined {
    const items = this.items
    if (this.head >= items.length) return undefined
    const item = items[this.head]
    items[this.head++] = undefined
    if (this.head === items.length) this.compact()
    else if (this.head >= 1024 && this.head * 2 >= items.length) this.compact()
    return item
  }

  /** The first item for which `test` holds, in queue order. */
  find(test: (item: T) => boolean): T | undefined {
    const items = this.items
    for (let i = this.head; i < items.length; i++) if (test(items[i]!)) return items[i]
    return undefined
  }

  /** Takes `item` out wherever it is (a waiter that gave up); false if it is not queued. */
  remove(item: T): boolean {
    const i = this.items.indexOf(item, this.head)
    if (i < 0) return false
    this.items.splice(i, 1)
    if (this.head === this.items.length) this.compact()
    return true
  }

  /** Empties the queue, returning what it held in order. */
  drain(): Array<T> {
    const out = this.items.slice(this.head) as Array<T>
    this.items = []
    this.head = 0
    return out
  }

  /** Drops the consumed prefix. Not `length = 0` / `splice`: see docs/architecture.md, hot-path rules. */
  private compact(): void {
    const items = this.items
    const head = this.head
    if (head < items.length) items.copyWithin(0, head)
    for (let i = 0; i < head; i++) items.pop()
    this.head = 0
  }
}
