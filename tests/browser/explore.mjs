// End-to-end test of `vit explore` in a real browser (Debian's Chromium, driven by
// playwright-core). Run by tests/cli_explore.rs, which starts the server and computes the
// expected numbers with other `vit` commands:
//   node explore.mjs EXPECTED.json
// EXPECTED.json: { url, image, bad_file, big_file, screenshot, chromium, label,
//   grid_h, grid_w, depth, heads, cls_maps: [per layer: mean-of-heads CLS map],
//   rollout: map (mean fusion, discard 0.5, through the last layer) }
// Exits non-zero with one line naming the failed check.

import { readFileSync } from 'node:fs';
import { chromium } from 'playwright-core';

const want = JSON.parse(readFileSync(process.argv[2], 'utf8'));

function check(ok, what) {
  if (!ok) throw new Error(`check failed: ${what}`);
}

const browser = await chromium.launch({
  executablePath: want.chromium,
  args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'],
});
const outside = [];
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 1100 } });
  const errors = [];
  page.on('pageerror', (e) => errors.push(e.message));
  // (Chromium logs every answer with an error status, such as the bad uploads' 400 and
  // 413, as "Failed to load resource"; those are expected and checked on the page.)
  page.on('console', (m) => {
    if (m.type() === 'error' && !m.text().startsWith('Failed to load resource')) errors.push(m.text());
  });
  const notFound = [];
  page.on('response', (r) => { if (r.status() === 404) notFound.push(r.url()); });
  // Nothing may be fetched from anywhere but the server itself.
  page.on('request', (r) => { if (!r.url().startsWith(want.url)) outside.push(r.url()); });

  await page.goto(want.url);
  await page.waitForFunction(() => document.body.dataset.ready === '1');
  const modelLine = await page.textContent('#model');
  check(modelLine.includes(`${want.depth} layers × ${want.heads} heads`), `model line: ${modelLine}`);
  // The position-embedding grid is drawn before any upload.
  await page.waitForFunction(() => document.body.dataset.pos === '1');

  const rendered = () => page.evaluate(() => Number(document.body.dataset.rendered || 0));
  const waitRender = (before) => page.waitForFunction(
    (b) => Number(document.body.dataset.rendered || 0) > b, before);
  const lut = await page.evaluate(async () => (await (await fetch('/api/model')).json()).colormaps.inferno);

  // The colour of every cell of the drawn map, read back from the canvas.
  const cells = () => page.evaluate(([gh, gw]) => {
    const c = document.getElementById('map');
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    const [cw, ch] = [c.width / gw, c.height / gh];
    const out = [];
    for (let r = 0; r < gh; r++) {
      for (let k = 0; k < gw; k++) {
        const x = Math.floor((k + 0.5) * cw);
        const y = Math.floor((r + 0.5) * ch);
        const i = 4 * (y * c.width + x);
        out.push([d[i], d[i + 1], d[i + 2]]);
      }
    }
    return out;
  }, [want.grid_h, want.grid_w]);
  const same = (a, b) => a[0] === b[0] && a[1] === b[1] && a[2] === b[2];
  const argmax = (m) => m.reduce((best, v, i) => (v > m[best] ? i : best), 0);
  // Every cell drawn in the colour of the library's value there.
  async function matches(map, what) {
    const got = await cells();
    map.forEach((v, i) => {
      const c = lut[Math.round(Math.min(1, Math.max(0, v)) * 255)];
      check(same(got[i], c), `${what}: cell ${i} drawn ${got[i]}, the library's value ${v} is ${c}`);
    });
    const hot = Number(await page.getAttribute('#hottest', 'data-index'));
    check(hot === argmax(map), `${what}: hottest patch ${hot}, the library's ${argmax(map)}`);
    check(same(got[hot], lut[255]), `${what}: the hottest cell is not the brightest colour`);
    return got;
  }

  // Upload the image; the page shows the prediction.
  let before = await rendered();
  await page.setInputFiles('#file', want.image);
  await page.waitForSelector('#topk li .label');
  await waitRender(before);
  const label = (await page.textContent('#topk li .label')).trim();
  check(label === want.label, `predicted '${label}', vit predict says '${want.label}'`);

  // The last layer is shown first (CLS attention, mean of heads).
  const last = want.depth - 1;
  const lastCells = await matches(want.cls_maps[last], `layer ${last}`);

  // Move the layer slider to 0: the map changes and matches layer 0's numbers.
  before = await rendered();
  await page.fill('#layer', '0');
  await waitRender(before);
  const firstCells = await matches(want.cls_maps[0], 'layer 0');
  check(firstCells.some((c, i) => !same(c, lastCells[i])), 'the map did not change with the layer');

  // Rollout through the last layer, discard 0.5.
  before = await rendered();
  await page.fill('#layer', String(last));
  await waitRender(before);
  before = await rendered();
  await page.check('input[name=mode][value=rollout]');
  await waitRender(before);
  before = await rendered();
  await page.fill('#discard', '0.5');
  await waitRender(before);
  await matches(want.rollout, 'rollout');

  // Click a patch: its own attention row is shown.
  before = await rendered();
  await page.check('input[name=mode][value=attention]');
  await waitRender(before);
  before = await rendered();
  const box = await page.locator('#overlay').boundingBox();
  await page.mouse.click(box.x + box.width * 0.9, box.y + box.height * 0.1); // top right
  await waitRender(before);
  const query = await page.inputValue('#query');
  check(query === 'patch', `the query after a click is '${query}'`);
  const caption = await page.textContent('#map-caption');
  check(caption.includes(`patch ${want.grid_w - 1} looks`), `caption after the click: ${caption}`);

  // The overview holds every layer × head.
  await page.waitForFunction(() => Number(document.body.dataset.overview || 0) > 0);
  const size = await page.evaluate(() => [document.getElementById('overview').width,
    document.getElementById('overview').height]);
  check(size[0] > want.heads && size[1] > want.depth, `overview canvas ${size}`);

  await page.screenshot({ path: want.screenshot, fullPage: true });

  // Bad uploads: a message on the page, and the server keeps serving.
  await page.setInputFiles('#file', want.bad_file);
  await page.waitForSelector('#message:not([hidden])');
  const bad = await page.textContent('#message');
  check(bad.includes('cannot decode image'), `message for a non-image: ${bad}`);
  await page.setInputFiles('#file', want.big_file);
  await page.waitForFunction(() => document.getElementById('message').textContent.includes('too large'));
  // The server refuses it too when a client sends it anyway.
  const refused = await page.evaluate(async () => {
    const max = (await (await fetch('/api/model')).json()).max_upload_bytes;
    const r = await fetch('/api/images', { method: 'POST', body: new Uint8Array(4 * max) });
    return [r.status, (await r.json()).error];
  });
  check(refused[0] === 413 && refused[1].includes('too large'), `the server's answer: ${refused}`);
  before = await rendered();
  await page.setInputFiles('#file', want.image);
  await waitRender(before);
  check(await page.isHidden('#message'), 'the message stays after a good upload');

  check(notFound.length === 0, `not found: ${notFound.join(' ')}`);
  check(errors.length === 0, `errors in the page: ${errors.join(' | ')}`);
  check(outside.length === 0, `requests outside the server: ${outside.join(' ')}`);
  console.log(`explorer ok: predicted '${label}', ${want.depth} layers checked cell by cell`);
} finally {
  await browser.close();
}
