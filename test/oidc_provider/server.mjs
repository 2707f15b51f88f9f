// A real identity provider for test/test_oidc_provider.py: node-oidc-provider issuing RS256 access tokens as JWTs
// (RFC 9068) for one resource (resource indicators, RFC 8707) through the client_credentials grant.
//
// Configured by environment variables, set by the test fixture:
//   OIDC_PORT        port on 127.0.0.1
//   OIDC_AUDIENCE    the resource indicator = the access tokens' aud (the app's FRACTAL_JWT_AUDIENCE)
//   OIDC_JWKS_FILE   a JSON file {"keys": [private RSA JWKs]}; the first one signs, all are published at /jwks
//   OIDC_JWKS_DELAY_MS  optional: delay every /jwks answer (a slow issuer)
// Key rotation is a restart with another OIDC_JWKS_FILE (the provider's keystore is fixed at start), as a
// deployment would roll it out. GET /test/stats answers how often /jwks was asked since start.
import { readFileSync } from 'node:fs';

import Provider from 'oidc-provider';

const port = Number(process.env.OIDC_PORT);
const audience = process.env.OIDC_AUDIENCE;
const jwks = JSON.parse(readFileSync(process.env.OIDC_JWKS_FILE, 'utf8'));
const jwksDelayMs = Number(process.env.OIDC_JWKS_DELAY_MS || 0);
const issuer = `http://127.0.0.1:${port}`;

const provider = new Provider(issuer, {
  clients: [
    {
      client_id: 'fractal-user',
      client_secret: 'user-secret',
      grant_types: ['client_credentials'],
      redirect_uris: [],
      response_types: [],
    },
    {
      client_id: 'fractal-operator',
      client_secret: 'operator-secret',
      grant_types: ['client_credentials'],
      redirect_uris: [],
      response_types: [],
      scope: 'admin',
    },
  ],
  jwks,
  scopes: ['admin'],
  cookies: { keys: ['fractal-test-only'] },
  ttl: { ClientCredentials: 300 },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => audience,
      useGrantedResource: () => true,
      getResourceServerInfo: (_ctx, resourceIndicator) => {
        if (resourceIndicator !== audience) {
          throw new Provider.errors.InvalidTarget();
        }
        return {
          scope: 'admin',
          audience,
          accessTokenTTL: 300,
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg: 'RS256' } },
        };
      },
    },
  },
});

provider.on('server_error', (_ctx, error) => { process.stderr.write(`server_error: ${error.stack}\n`); });
provider.on('grant.error', (_ctx, error) => { process.stderr.write(`grant.error: ${error.message}\n`); });

let jwksRequests = 0;
provider.use(async (ctx, next) => {
  if (ctx.path === '/test/stats') {
    ctx.body = { jwks_requests: jwksRequests };
    return;
  }
  if (ctx.path === '/jwks') {
    jwksRequests += 1;
    if (jwksDelayMs) {
      await new Promise((resolve) => { setTimeout(resolve, jwksDelayMs); });
    }
  }
  await next();
});

const server = provider.listen(port, '127.0.0.1', () => {
  process.stdout.write(`oidc-provider listening on ${issuer}\n`);
});

function stop() {
  server.close(() => process.exit(0));
  server.closeAllConnections();
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
