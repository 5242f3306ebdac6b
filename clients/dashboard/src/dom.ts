// Small DOM helpers shared by the list and the task page.

import { seconds, stateOf, type Task } from "./model.js";

export const $ = <T extends HTMLElement>(id: string): T => {
  const found = document.getElementById(id);
  if (!found) throw new Error(`#${id} missing from index.html`);
  return found as T;
};

export function el(tag: string, text = "", cls = ""): HTMLElement {
  const node = document.createElement(tag);
  if (text) node.textContent = text;
  if (cls) node.className = cls;
  return node;
}

export function runtime(t: Task): string {
  const start = seconds(t.startTime);
  if (start === undefined) return "";
  const end = seconds(t.endTime) ?? Date.now() / 1000;
  return `${Math.max(0, end - start).toFixed(1)} s`;
}

export function progressBar(t: Task): HTMLElement {
  const bar = document.createElement("progress");
  bar.max = 1;
  bar.value = stateOf(t) === "SUCCEEDED" ? 1 : (t.progress?.fraction ?? 0);
  bar.title = t.progress?.message ?? "";
  return bar;
}
