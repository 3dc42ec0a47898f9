import { Schema } from "effect"
import { Tenant } from "../config/index.ts"

const encode = Schema.encodeSync(Tenant)

/** A tenant as the API shows it: the API's own input shape, without any password or key. */
export const tenantJson = (tenant: Tenant) => {
  const { users, jit_jwt_secret: _, ...rest } = encode(tenant)
  return { ...rest, users: users.map(({ db_password: _, ...user }) => user) }
}
