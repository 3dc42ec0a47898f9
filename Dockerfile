# Tidepool: build the TypeScript once, run the compiled CLI on a slim Node 20 image.
FROM node:20-bookworm-slim AS build
# better-sqlite3 (the tenant store) compiles its native addon when no prebuilt binary fits.
RUN apt-get update && apt-get install -y --no-install-recommends python3 make g++ \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci
COPY tsconfig.json tsconfig.build.json ./
COPY src ./src
RUN npm run build && npm prune --omit=dev

FROM node:20-bookworm-slim
ENV NODE_ENV=production \
    TIDEPOOL_LOG_FORMAT=json \
    TIDEPOOL_DATA_DIR=/var/lib/tidepool
WORKDIR /app
COPY package.json package-lock.json ./
# Production dependencies as built above, native addons included.
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
