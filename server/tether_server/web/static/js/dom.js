// Small DOM helpers shared by the list and the task page.
import { seconds, stateOf } from "./model.js";
export const $ = (id) => {
    const found = document.getElementById(id);
    if (!found)
        throw new Error(`#${id} missing from index.html`);
    return found;
};
export function el(tag, text = "", cls = "") {
    const node = document.createElement(tag);
    if (text)
        node.textContent = text;
    if (cls)
        node.className = cls;
    return node;
}
export function runtime(t) {
    const start = seconds(t.startTime);
    if (start === undefined)
        return "";
    const end = seconds(t.endTime) ?? Date.now() / 1000;
    return `${Math.max(0, end - start).toFixed(1)} s`;
}
export function progressBar(t) {
    const bar = document.createElement("progress");
    bar.max = 1;
    bar.value = stateOf(t) === "SUCCEEDED" ? 1 : (t.progress?.fraction ?? 0);
    bar.title = t.progress?.message ?? "";
    return bar;
}
