import { createHash } from "node:crypto"

const md5hex = (data: string | Buffer): string => createHash("md5").update(data).digest("hex")

/** The PasswordMessage answer to AuthenticationMD5Password: "md5" + md5hex(md5hex(password + user) + salt). */
export const md5Password = (user: string, password: string, salt: Buffer): string =>
  "md5" + md5hex(Buffer.concat([Buffer.from(md5hex(password + user)), salt]))
