// vit explore: the page only draws. Every number (prediction, attention maps, rollout,
// position-embedding similarity, the colormaps) comes from the server's JSON API, which
// computes it with the library (vit::explain).

const $ = (id) => document.getElementById(id);
const PANEL = 336; // longer side of the two main pictures, in CSS pixels

const state = {
  model: null,   // /api/model
  id: null,      // the current image's id
  input: null,   // the model input as an <img>
  patch: null,   // the clicked patch index, or null
  pos: null,     // /api/pos-embed, or null
  map: null,     // the map drawn, row-major over the patch grid
  overview: null, // every layer × head map
  seq: 0,        // latest map request; older answers are dropped
  overviewSeq: 0,
  rendered: 0,   // maps drawn so far (tests wait on body[data-rendered])
};

async function api(url, options) {
  const r = await fetch(url, options);
  const body = await r.json().catch(() => ({ error: `${r.status} ${r.statusText}` }));
  if (!r.ok) throw new Error(body.error || `${r.status} ${r.statusText}`);
  return body;
}

function showMessage(text) {
  const m = $('message');
  m.textContent = text || '';
  m.hidden = !text;
}

function lut() {
  return state.model.colormaps[$('colormap').value];
}

// Colour of v in [0, 1] (clamped); grey where v is not a number.
function colour(v) {
  if (!Number.isFinite(v)) return [128, 128, 128];
  return lut()[Math.round(Math.min(1, Math.max(0, v)) * 255)];
}

function layout() {
  return state.model.layout;
}

function mode() {
  return document.querySelector('input[name=mode]:checked').value;
}

function headParam() {
  const h = Number($('head').value);
  return h === 0 ? 'mean' : String(h - 1);
}

function queryParam() {
  const q = $('query').value;
  return q === 'patch' ? `patch:${state.patch}` : q;
}

function updateOutputs() {
  $('layer-out').textContent = $('layer').value;
  $('head-out').textContent = headParam();
  $('discard-out').textContent = $('discard').value;
}

async function init() {
  try {
    state.model = await api('/api/model');
  } catch (e) {
    $('model').textContent = `cannot load the model: ${e.message}`;
    return;
  }
  const m = state.model;
  const l = m.layout;
  $('model').textContent =
    `${m.name} · ${m.arch} · input ${l.image_h}×${l.image_w} · ${l.grid_h}×${l.grid_w} patches of ` +
    `${l.patch} px · ${l.depth} layers × ${l.heads} heads · ${m.classes} classes`;
  $('layer').max = l.depth - 1;
  $('layer').value = l.depth - 1;
  $('head').max = l.heads;
  if (!l.class_token) {
    const cls = document.querySelector('#query option[value=cls]');
    cls.disabled = true;
    cls.textContent = 'CLS token (the model has none)';
    $('query').value = 'mean';
  }
  updateOutputs();
  if (m.has_pos_embed) {
    try {
      state.pos = await api('/api/pos-embed');
      drawPosGrid();
    } catch (e) {
      showMessage(e.message);
    }
  } else {
    document.querySelector('input[name=mode][value=pos]').disabled = true;
    $('pos-hint').textContent = 'this model has no position embedding';
  }
  wire();
  document.body.dataset.ready = '1';
  refresh();
}

function wire() {
  $('file').addEventListener('change', () => {
    if ($('file').files.length) upload($('file').files[0]);
  });
  const drop = $('drop');
  drop.addEventListener('dragover', (e) => { e.preventDefault(); drop.classList.add('over'); });
  drop.addEventListener('dragleave', () => drop.classList.remove('over'));
  drop.addEventListener('drop', (e) => {
    e.preventDefault();
    drop.classList.remove('over');
    if (e.dataTransfer.files.length) upload(e.dataTransfer.files[0]);
  });
  for (const id of ['layer', 'head', 'discard', 'fusion', 'query']) {
    $(id).addEventListener('input', () => { updateOutputs(); refresh(); drawOverview(); });
  }
  $('query').addEventListener('change', () => { refresh(); refreshOverview(); });
  for (const r of document.querySelectorAll('input[name=mode]')) {
    r.addEventListener('change', () => { refresh(); drawOverview(); });
  }
  for (const id of ['alpha', 'grid']) $(id).addEventListener('input', redraw);
  $('colormap').addEventListener('change', () => { redraw(); refreshOverview(); drawPosGrid(); });
  $('overlay').addEventListener('click', clickPatch);
  $('overview').addEventListener('click', clickOverview);
  $('controls').addEventListener('submit', (e) => e.preventDefault());
}

async function upload(file) {
  const max = state.model.max_upload_bytes;
  if (file.size > max) {
    showMessage(`the upload is too large: ${file.size} bytes, the limit is ${max} bytes (--max-upload)`);
    return;
  }
  let r;
  try {
    r = await api('/api/images', { method: 'POST', body: file });
  } catch (e) {
    showMessage(e.message);
    return;
  }
  showMessage('');
  state.id = r.id;
  state.patch = null;
  const patchOption = document.querySelector('#query option[value=patch]');
  patchOption.disabled = true;
  if ($('query').value === 'patch') $('query').value = layout().class_token ? 'cls' : 'mean';
  showPrediction(r.top_k, r.notes);
  const img = new Image();
  img.src = `/api/images/${r.id}/input.png`;
  await img.decode();
  state.input = img;
  await refresh();
  await refreshOverview();
}

function showPrediction(topK, notes) {
  const ol = $('topk');
  ol.replaceChildren();
  for (const c of topK) {
    const li = document.createElement('li');
    const label = document.createElement('span');
    label.className = 'label';
    label.textContent = c.label;
    const p = document.createElement('span');
    p.className = 'probability';
    p.textContent = ` ${(100 * c.probability).toFixed(1)}%`;
    const bar = document.createElement('span');
    bar.className = 'bar';
    bar.style.width = `${Math.max(1, 100 * c.probability)}%`;
    li.append(label, p, bar);
    ol.append(li);
  }
  if (!topK.length) ol.innerHTML = '<li class="empty">the model has no classifier head</li>';
  $('notes').replaceChildren(...notes.map((n) => {
    const li = document.createElement('li');
    li.textContent = n;
    return li;
  }));
}

// Fetches the map the controls ask for and draws it.
async function refresh() {
  const seq = ++state.seq;
  const m = mode();
  let map;
  let caption;
  try {
    if (m === 'pos') {
      if (!state.pos) return;
      const n = state.pos.n;
      const i = state.patch ?? 0;
      // cosine similarity in [-1, 1] drawn on [0, 1]
      map = state.pos.sim.slice(i * n, (i + 1) * n).map((v) => (v + 1) / 2);
      caption = `similarity of patch ${i}'s position embedding to every other (−1 … 1)`;
    } else {
      if (state.id === null) return;
      const q = queryParam();
      const l = $('layer').value;
      const url = m === 'rollout'
        ? `/api/images/${state.id}/rollout?layer=${l}&fusion=${$('fusion').value}&discard=${$('discard').value}&query=${q}`
        : `/api/images/${state.id}/attention?layer=${l}&head=${headParam()}&query=${q}`;
      const r = await api(url);
      if (seq !== state.seq) return;
      map = r.map;
      caption = m === 'rollout'
        ? `rollout through layers 0–${l}, ${$('fusion').value} fusion, discard ${$('discard').value}, ${queryName(q)} (÷ max)`
        : `layer ${l}, head ${headParam()}, ${queryName(q)} (÷ max)`;
    }
  } catch (e) {
    showMessage(e.message);
    return;
  }
  if (seq !== state.seq) return;
  state.map = map;
  $('map-caption').textContent = caption;
  redraw();
}

function queryName(q) {
  if (q === 'cls') return 'CLS attention';
  if (q === 'mean') return 'mean-query attention';
  return `where patch ${state.patch} looks`;
}

function hottestOf(map) {
  let best = 0;
  for (let i = 1; i < map.length; i++) if (map[i] > map[best]) best = i;
  return best;
}

function redraw() {
  if (!state.map) return;
  const { grid_h: gh, grid_w: gw } = layout();
  drawMap(state.map, gh, gw);
  drawOverlay(state.map, gh, gw);
  const h = hottestOf(state.map);
  const out = $('hottest');
  out.dataset.index = String(h);
  out.textContent = `${h} (row ${Math.floor(h / gw)}, column ${h % gw})`;
  state.rendered += 1;
  document.body.dataset.rendered = String(state.rendered);
}

// One flat cell per patch, exactly the colormap's colour of its value.
function drawMap(map, gh, gw) {
  const cell = Math.max(1, Math.floor(PANEL / Math.max(gh, gw)));
  const c = $('map');
  c.width = gw * cell;
  c.height = gh * cell;
  const ctx = c.getContext('2d');
  for (let r = 0; r < gh; r++) {
    for (let k = 0; k < gw; k++) {
      const [R, G, B] = colour(map[r * gw + k]);
      ctx.fillStyle = `rgb(${R},${G},${B})`;
      ctx.fillRect(k * cell, r * cell, cell, cell);
    }
  }
}

function overlaySize() {
  const { image_h: h, image_w: w } = layout();
  const s = PANEL / Math.max(h, w);
  return [Math.round(w * s), Math.round(h * s)];
}

// The input, the map smoothly upsampled over it (opaque where the map is strongest),
// the patch grid and the clicked patch.
function drawOverlay(map, gh, gw) {
  const c = $('overlay');
  const [w, h] = overlaySize();
  c.width = w;
  c.height = h;
  const ctx = c.getContext('2d');
  ctx.imageSmoothingEnabled = false;
  if (state.input) {
    ctx.drawImage(state.input, 0, 0, w, h);
  } else {
    ctx.fillStyle = '#777';
    ctx.fillRect(0, 0, w, h);
  }
  const small = document.createElement('canvas');
  small.width = gw;
  small.height = gh;
  const px = small.getContext('2d').createImageData(gw, gh);
  const alpha = Number($('alpha').value);
  for (let i = 0; i < gh * gw; i++) {
    const [R, G, B] = colour(map[i]);
    px.data.set([R, G, B, Math.round(255 * alpha * Math.min(1, Math.max(0, map[i] || 0)))], 4 * i);
  }
  small.getContext('2d').putImageData(px, 0, 0);
  ctx.imageSmoothingEnabled = true;
  ctx.drawImage(small, 0, 0, w, h);
  const [cw, ch] = [w / gw, h / gh];
  if ($('grid').checked) {
    ctx.strokeStyle = 'rgba(255,255,255,0.35)';
    ctx.lineWidth = 1;
    ctx.beginPath();
    for (let k = 1; k < gw; k++) { ctx.moveTo(k * cw, 0); ctx.lineTo(k * cw, h); }
    for (let r = 1; r < gh; r++) { ctx.moveTo(0, r * ch); ctx.lineTo(w, r * ch); }
    ctx.stroke();
  }
  if (state.patch !== null) {
    ctx.strokeStyle = '#00e5ff';
    ctx.lineWidth = 2;
    ctx.strokeRect((state.patch % gw) * cw + 1, Math.floor(state.patch / gw) * ch + 1, cw - 2, ch - 2);
  }
}

function clickPatch(e) {
  const { grid_h: gh, grid_w: gw } = layout();
  const c = $('overlay');
  const rect = c.getBoundingClientRect();
  const k = Math.min(gw - 1, Math.floor(((e.clientX - rect.left) / rect.width) * gw));
  const r = Math.min(gh - 1, Math.floor(((e.clientY - rect.top) / rect.height) * gh));
  state.patch = r * gw + k;
  const option = document.querySelector('#query option[value=patch]');
  option.disabled = false;
  option.textContent = `patch ${state.patch} (row ${r}, column ${k})`;
  if (mode() !== 'pos') $('query').value = 'patch';
  refresh();
  refreshOverview();
}

function overviewGeometry() {
  const { grid_h: gh, grid_w: gw } = layout();
  const cell = Math.max(1, Math.floor(48 / Math.max(gh, gw)));
  return { gh, gw, cell, gap: 3, mw: gw * cell, mh: gh * cell };
}

async function refreshOverview() {
  if (state.id === null) return;
  const seq = ++state.overviewSeq;
  let r;
  try {
    r = await api(`/api/images/${state.id}/overview?query=${queryParam()}`);
  } catch (e) {
    showMessage(e.message);
    return;
  }
  if (seq !== state.overviewSeq) return;
  state.overview = r.maps;
  drawOverview();
}

function drawOverview() {
  if (!state.overview) return;
  const { depth, heads } = layout();
  const g = overviewGeometry();
  const c = $('overview');
  c.width = heads * (g.mw + g.gap);
  c.height = depth * (g.mh + g.gap);
  const ctx = c.getContext('2d');
  ctx.clearRect(0, 0, c.width, c.height);
  state.overview.forEach((map, i) => {
    const [L, H] = [Math.floor(i / heads), i % heads];
    const [x0, y0] = [H * (g.mw + g.gap), L * (g.mh + g.gap)];
    for (let p = 0; p < g.gh * g.gw; p++) {
      const [R, G, B] = colour(map[p]);
      ctx.fillStyle = `rgb(${R},${G},${B})`;
      ctx.fillRect(x0 + (p % g.gw) * g.cell, y0 + Math.floor(p / g.gw) * g.cell, g.cell, g.cell);
    }
  });
  if (mode() === 'attention' && headParam() !== 'mean') {
    ctx.strokeStyle = '#00e5ff';
    ctx.lineWidth = 2;
    const [L, H] = [Number($('layer').value), Number($('head').value) - 1];
    ctx.strokeRect(H * (g.mw + g.gap), L * (g.mh + g.gap), g.mw, g.mh);
  }
  $('overview-what').textContent = `(${queryName(queryParam())}, each ÷ its max)`;
  document.body.dataset.overview = String((Number(document.body.dataset.overview) || 0) + 1);
}

function clickOverview(e) {
  const { depth, heads } = layout();
  const g = overviewGeometry();
  const rect = $('overview').getBoundingClientRect();
  const H = Math.floor((e.clientX - rect.left) / (g.mw + g.gap));
  const L = Math.floor((e.clientY - rect.top) / (g.mh + g.gap));
  if (H < 0 || H >= heads || L < 0 || L >= depth) return;
  $('layer').value = L;
  $('head').value = H + 1;
  document.querySelector('input[name=mode][value=attention]').checked = true;
  updateOutputs();
  refresh();
  drawOverview();
}

// Figure 7 of the ViT paper: at each patch position, that position's similarity map.
function drawPosGrid() {
  if (!state.pos) return;
  const { grid_h: gh, grid_w: gw, n, sim } = state.pos;
  const cell = Math.max(1, Math.floor(40 / Math.max(gh, gw)));
  const gap = 2;
  const [mw, mh] = [gw * cell, gh * cell];
  const c = $('pos');
  c.width = gw * (mw + gap);
  c.height = gh * (mh + gap);
  const ctx = c.getContext('2d');
  for (let i = 0; i < n; i++) {
    const [x0, y0] = [(i % gw) * (mw + gap), Math.floor(i / gw) * (mh + gap)];
    for (let j = 0; j < n; j++) {
      const [R, G, B] = colour((sim[i * n + j] + 1) / 2);
      ctx.fillStyle = `rgb(${R},${G},${B})`;
      ctx.fillRect(x0 + (j % gw) * cell, y0 + Math.floor(j / gw) * cell, cell, cell);
    }
  }
  document.body.dataset.pos = '1';
}

init();
