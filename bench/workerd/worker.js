// workerd peer for the Colony benchmark.
//
//   POST /obj/{name}/incr  -> {"n": <counter after increment>}
//   GET  /obj/{name}/read  -> {"n": <counter, 0 if never incremented>}
//
// Each {name} maps to one Durable Object (env.NS.idFromName(name)) whose state
// is a one-row SQLite table.
import { DurableObject } from "cloudflare:workers";

export class Counter extends DurableObject {
  constructor(ctx, env) {
    super(ctx, env);
    this.sql = ctx.storage.sql;
    this.sql.exec(
      "CREATE TABLE IF NOT EXISTS counter(id INTEGER PRIMARY KEY, n INTEGER NOT NULL)",
    );
  }

  incr() {
    return this.sql
      .exec(
        "INSERT INTO counter(id, n) VALUES (1, 1) " +
          "ON CONFLICT(id) DO UPDATE SET n = n + 1 RETURNING n",
      )
      .one().n;
  }

  read() {
    const rows = this.sql.exec("SELECT n FROM counter WHERE id = 1").toArray();
    return rows.length === 0 ? 0 : rows[0].n;
  }
}

const ROUTE = /^\/obj\/([^/]+)\/(incr|read)$/;

function json(body, status = 200) {
  return new Response(JSON.stringify(body), {
    status,
    headers: { "content-type": "application/json" },
  });
}

export default {
  async fetch(request, env) {
    const url = new URL(request.url);
    const m = ROUTE.exec(url.pathname);
    if (m === null) {
      return json({ error: "not found" }, 404);
    }
    const name = decodeURIComponent(m[1]);
    const op = m[2];
    const stub = env.NS.get(env.NS.idFromName(name));
    if (op === "incr") {
      if (request.method !== "POST") {
        return json({ error: "method not allowed" }, 405);
      }
      return json({ n: await stub.incr() });
    }
    if (request.method !== "GET") {
      return json({ error: "method not allowed" }, 405);
    }
    return json({ n: await stub.read() });
  },
};
