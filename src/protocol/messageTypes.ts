/*
 * The protocol's message type bytes, in one place (PostgreSQL's "Message Formats"). Frontend and
 * backend reuse letters for different messages ('D' is Describe from a client, DataRow from a
 * server), hence two tables. Hot code copies what it needs into module constants
 * (`const { Query: Q } = Frontend`), which cost nothing per message.
 */

/** Messages a client sends after startup. */
export const Frontend = {
  Bind: 0x42, // B
  Close: 0x43, // C
  CopyData: 0x64, // d
  CopyDone: 0x63, // c
  CopyFail: 0x66, // f
  Describe: 0x44, // D
  Execute: 0x45, // E
  Flush: 0x48, // H
  FunctionCall: 0x46, // F
  Parse: 0x50, // P
  /** PasswordMessage, SASLInitialResponse and SASLResponse share it. */
  Password: 0x70, // p
  Query: 0x51, // Q
  Sync: 0x53, // S
  Terminate: 0x58 // X
} as const

/** Messages a server sends. */
export const Backend = {
  Authentication: 0x52, // R
  BackendKeyData: 0x4b, // K
  BindComplete: 0x32, // 2
  CloseComplete: 0x33, // 3
  CommandComplete: 0x43, // C
  CopyInResponse: 0x47, // G
  DataRow: 0x44, // D
  EmptyQueryResponse: 0x49, // I
  ErrorResponse: 0x45, // E
  NoData: 0x6e, // n
  NotificationResponse: 0x41, // A
  ParameterDescription: 0x74, // t
  ParameterStatus: 0x53, // S
  ParseComplete: 0x31, // 1
  PortalSuspended: 0x73, // s
  ReadyForQuery: 0x5a, // Z
  RowDescription: 0x54 // T
} as const

/** The byte that names a prepared statement (not a portal) in Describe and Close. */
export const STATEMENT_TARGET = 0x53 // S

/** Transaction status bytes of ReadyForQuery. */
export const TxStatus = { Idle: 0x49, InTransaction: 0x54, Failed: 0x45 } as const

/**
 * What a client message means to a relay that counts the ReadyForQuery messages it will cause and
 * tracks extended-protocol exchanges (see TransactionRelay's release rule); both relays use it.
 */
export const ClientMessage = {
  /** Query or FunctionCall: answered by a ReadyForQuery; concludes any exchange. */
  Producer: 1,
  /** Sync: answered by a ReadyForQuery; concludes an extended-protocol exchange. */
  Sync: 2,
  /** Terminate. */
  Terminate: 3,
  /** Flush, CopyData, CopyDone, CopyFail: no reply of their own, and they neither open nor close an exchange. */
  Neutral: 4,
  /** Parse, Bind, Describe, Execute, Close, and any type we do not know: the server waits for a Sync. */
  Opens: 5
} as const

const kinds = (() => {
  const table = new Uint8Array(256).fill(ClientMessage.Opens)
  table[Frontend.Query] = ClientMessage.Producer
  table[Frontend.FunctionCall] = ClientMessage.Producer
  table[Frontend.Sync] = ClientMessage.Sync
  table[Frontend.Terminate] = ClientMessage.Terminate
  for (const type of [Frontend.Flush, Frontend.CopyData, Frontend.CopyDone, Frontend.CopyFail]) {
    table[type] = ClientMessage.Neutral
  }
  return table
})()

/** The `ClientMessage` kind of a frontend message type byte. */
export const classifyClientMessage = (type: number): number => kinds[type]!
