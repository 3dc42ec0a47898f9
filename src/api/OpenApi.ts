import { JsonSchema, Schema } from "effect"
import { Tenant } from "../config/index.ts"
import type { Route } from "./routes.ts"

/** `/api/tenants/:id` → `/api/tenants/{id}`. */
export const openApiPath = (path: string) => path.replace(/:([A-Za-z_]+)/g, "{$1}")

// The PUT body's tenant: `external_id` comes from the URL, and the ban fields only through PATCH.
// Draft-07, as OpenAPI 3.0 schemas are written; closed objects, as the API decodes bodies strictly.
const tenantInput = (() => {
  const schema = JsonSchema.toDocumentDraft07(
    Schema.toJsonSchemaDocument(Schema.toEncoded(Tenant), { onExcessProperty: "error" })
  ).schema as {
    required: Array<string>
    properties: Record<string, unknown>
  }
  const { banned_at: _a, ban_reason: _r, banned_until: _u, ...properties } = schema.properties
  return { ...schema, properties, required: schema.required.filter((f) => f !== "external_id") }
})()

/** The OpenAPI 3.0 document of `routes`, served at /api/openapi. */
export const openApiDocument = (routes: ReadonlyArray<Route>) => {
  const paths: Record<string, Record<string, unknown>> = {}
  for (const route of routes) {
    const path = openApiPath(route.path)
    const params = [...route.path.matchAll(/:([A-Za-z_]+)/g)].map((m) => ({
      name: m[1],
      in: "path",
      required: true,
      schema: { type: "string" }
    }))
    paths[path] ??= {}
    paths[path][route.method.toLowerCase()] = {
      summary: route.summary,
      ...(params.length > 0 ? { parameters: params } : {}),
      ...(route.public === true ? { security: [] } : {}),
      ...(route.requestBody !== undefined
        ? { requestBody: { required: true, content: { "application/json": { schema: route.requestBody } } } }
        : {}),
      responses: Object.fromEntries(
        Object.entries({
          ...route.responses,
          ...(route.requestBody !== undefined ? { "413": '{"error": …} (body over 1 MiB)' } : {}),
          ...(route.public === true
            ? {}
            : {
                "401": '{"error": reason} (a valid token expiring too far ahead, see TIDEPOOL_JWT_MAX_LIFETIME)',
                "403": "missing or refused token (empty body)"
              })
        }).map(([status, description]) => [status, { description }])
      )
    }
  }
  return {
    openapi: "3.0.3",
    info: {
      title: "Tidepool management API",
      version: "1",
      description:
        "Supavisor-compatible tenant management. Every route but health and this document needs `Authorization: Bearer <JWT>`."
    },
    components: {
      securitySchemes: { bearer: { type: "http", scheme: "bearer", bearerFormat: "JWT" } },
      schemas: { TenantInput: tenantInput }
    },
    security: [{ bearer: [] }],
    paths
  }
}
