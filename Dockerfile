# Tidepool: build the TypeScript once, run the compiled CLI on a slim Node 20 image.
FROM node:20-bookworm-slim AS build
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --ignore-scripts
COPY tsconfig.json tsconfig.build.json ./
COPY src ./src
RUN npm run build

FROM node:20-bookworm-slim
ENV NODE_ENV=production \
    TIDEPOOL_LOG_FORMAT=json \
    TIDEPOOL_DATA_DIR=/var/lib/tidepool
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --ignore-scripts && npm cache clean --force
COPY bin ./bin
COPY --from=build /app/dist ./dist
COPY otel/prometheus/make-token.mjs ./otel/prometheus/make-token.mjs
RUN mkdir -p /var/lib/tidepool && chown node:node /var/lib/tidepool
USER node
# 6543 transaction mode, 5432 session mode, 4000 HTTP API and /metrics
EXPOSE 6543 5432 4000
ENTRYPOINT ["node", "bin/tidepool.js"]
CMD ["serve"]
