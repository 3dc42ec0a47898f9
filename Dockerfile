# Tidepool: build the TypeScript once, run the compiled CLI on a slim Node 24 image.
# Nothing is compiled natively: the tenant store uses Node's own node:sqlite.
FROM node:24-bookworm-slim AS build
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci
COPY tsconfig.json tsconfig.build.json ./
COPY src ./src
RUN npm run build && npm prune --omit=dev

FROM node:24-bookworm-slim
ENV NODE_ENV=production \
    TIDEPOOL_LOG_FORMAT=json \
    TIDEPOOL_DATA_DIR=/var/lib/tidepool
WORKDIR /app
COPY package.json package-lock.json ./
# Production dependencies as installed above (the `node` dev dependency is pruned: the image has Node 24).
COPY --from=build /app/node_modules ./node_modules
COPY bin ./bin
COPY --from=build /app/dist ./dist
COPY otel/prometheus/make-token.mjs ./otel/prometheus/make-token.mjs
RUN mkdir -p /var/lib/tidepool && chown node:node /var/lib/tidepool
USER node
# 6543 transaction mode, 5432 session mode, 4000 HTTP API and /metrics
EXPOSE 6543 5432 4000
ENTRYPOINT ["node", "bin/tidepool.js"]
CMD ["serve"]
