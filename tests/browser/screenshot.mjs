// The README's picture of `vit explore`: uploads an image to a running explorer and saves a
// screenshot of the page.
//   node screenshot.mjs URL IMAGE OUT.png [CHROMIUM]
import { chromium } from 'playwright-core';

const [url, image, out, exe = '/usr/bin/chromium'] = process.argv.slice(2);
const browser = await chromium.launch({ executablePath: exe, args: ['--no-sandbox', '--disable-gpu'] });
try {
  const page = await browser.newPage({ viewport: { width: 1240, height: 900 } });
  await page.goto(url);
  await page.waitForFunction(() => document.body.dataset.ready === '1');
  await page.setInputFiles('#file', image);
  await page.waitForFunction(() => Number(document.body.dataset.overview || 0) > 0);
  await page.waitForFunction(() => Number(document.body.dataset.rendered || 0) > 0);
  await page.screenshot({ path: out, fullPage: true });
} finally {
  await browser.close();
}
