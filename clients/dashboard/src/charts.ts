// Two small canvas charts over the last minutes: finished tasks per 10 s, and the
// latency of each interrupt (request -> terminal) coloured by the stage that ended it.

import type { Finish } from "./model.js";

const WINDOW_SECONDS = 300;
const BUCKET_SECONDS = 10;
const STAGE_COLOURS: Record<string, string> = {
  SIGINT: "#2f855a",
  SIGTERM: "#b7791f",
  SIGKILL: "#c53030",
  DEQUEUED: "#4a5568",
};

function prepare(canvas: HTMLCanvasElement): CanvasRenderingContext2D | null {
  const ctx = canvas.getContext("2d");
  if (!ctx) return null;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.font = "11px sans-serif";
  ctx.fillStyle = "#718096";
  return ctx;
}

export function drawThroughput(canvas: HTMLCanvasElement, finishes: Finish[]): void {
  const ctx = prepare(canvas);
  if (!ctx) return;
  const now = Date.now() / 1000;
  const buckets = new Array<number>(WINDOW_SECONDS / BUCKET_SECONDS).fill(0);
  for (const f of finishes) {
    const age = now - f.at;
    if (age < 0 || age >= WINDOW_SECONDS) continue;
    const i = buckets.length - 1 - Math.floor(age / BUCKET_SECONDS);
    buckets[i] = (buckets[i] ?? 0) + 1;
  }
  const peak = Math.max(1, ...buckets);
  const w = canvas.width / buckets.length;
  const h = canvas.height - 14;
  ctx.fillText(`finished / ${BUCKET_SECONDS} s, last ${WINDOW_SECONDS / 60} min (peak ${peak})`, 2, 10);
  ctx.fillStyle = "#3182ce";
  buckets.forEach((n, i) => {
    const bh = (n / peak) * (h - 4);
    ctx.fillRect(i * w + 1, canvas.height - bh, w - 2, bh);
  });
}

export function drawInterruptLatency(canvas: HTMLCanvasElement, finishes: Finish[]): void {
  const ctx = prepare(canvas);
  if (!ctx) return;
  const now = Date.now() / 1000;
  const points = finishes.filter(
    (f) => f.interruptLatency !== undefined && now - f.at < WINDOW_SECONDS,
  );
  const peak = Math.max(0.1, ...points.map((p) => p.interruptLatency ?? 0));
  ctx.fillText(`interrupt latency, s (max ${peak.toFixed(2)})`, 2, 10);
  let x = 2;
  for (const [stage, colour] of Object.entries(STAGE_COLOURS)) {
    ctx.fillStyle = colour;
    ctx.fillText(stage, x, 23);
    x += 62;
  }
  const h = canvas.height - 28;
  for (const p of points) {
    const px = ((WINDOW_SECONDS - (now - p.at)) / WINDOW_SECONDS) * (canvas.width - 6) + 3;
    const py = canvas.height - 3 - ((p.interruptLatency ?? 0) / peak) * (h - 4);
    ctx.fillStyle = STAGE_COLOURS[p.stage ?? ""] ?? "#4a5568";
    ctx.beginPath();
    ctx.arc(px, py, 3, 0, 2 * Math.PI);
    ctx.fill();
  }
}
