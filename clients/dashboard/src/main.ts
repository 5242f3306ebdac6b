// The dashboard: a live task table, a task page, an engines panel, small charts and a
// submit form, over one StreamTaskStatus that resumes from its token after any break.
// Everything is rendered with textContent (never innerHTML): task data cannot inject markup.

import { call, stream, TetherError, token } from "./api.js";
import { drawInterruptLatency, drawThroughput } from "./charts.js";
import { $, el, progressBar, runtime } from "./dom.js";
import {
  type Engine,
  STATES,
  type StreamResponse,
  type Task,
  TaskTable,
  TERMINAL,
  seconds,
  short,
  stateOf,
} from "./model.js";
import { renderTaskPage, type TaskPage } from "./taskpage.js";

const table = new TaskTable();
let connection: "connecting" | "live" | "reconnecting" | "needs-token" = "connecting";
let page: TaskPage | null = null;
let tokenSaved: () => void = () => {};

// The browser test reads these to check there was no gap and no duplicate.
(window as unknown as { tetherDashboard: object }).tetherDashboard = {
  table,
  connection: () => connection,
};

function setConnection(state: typeof connection, detail = ""): void {
  connection = state;
  const badge = $("conn");
  badge.dataset.state = state;
  badge.textContent = state === "reconnecting" ? `reconnecting… ${detail}` : state;
}

// ------------------------------------------------------------------ auth
function askToken(refused: boolean): Promise<void> {
  setConnection("needs-token");
  $("auth").hidden = false;
  $("auth-error").textContent = refused ? "the server refused that token" : "";
  $<HTMLInputElement>("auth-token").focus();
  return new Promise((resolve) => {
    tokenSaved = resolve;
  });
}

function wireAuth(): void {
  $("auth-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const input = $<HTMLInputElement>("auth-token");
    token.set(input.value.trim());
    input.value = "";
    $("auth").hidden = true;
    tokenSaved();
  });
  $("logout").addEventListener("click", () => {
    token.clear();
    location.reload();
  });
}

/** Runs ``fn``; when the server wants a (better) token, asks for it and tries again. */
async function authed<T>(fn: () => Promise<T>): Promise<T> {
  for (;;) {
    try {
      return await fn();
    } catch (err) {
      if (!(err instanceof TetherError) || err.code !== "unauthenticated") throw err;
      await askToken(token.get() !== "");
    }
  }
}

// ------------------------------------------------------------------ the stream
async function listAll(): Promise<void> {
  const tasks: Task[] = [];
  let pageToken = "";
  let resumeToken = "";
  for (let i = 0; i < 20; i++) {
    const answer = await call<{ tasks?: Task[]; nextPageToken?: string; resumeToken?: string }>(
      "TaskService",
      "ListTasks",
      { pageSize: 500, pageToken },
    );
    tasks.push(...(answer.tasks ?? []));
    if (!resumeToken) resumeToken = answer.resumeToken ?? ""; // taken before the first page
    pageToken = answer.nextPageToken ?? "";
    if (!pageToken) break;
  }
  table.reset(tasks, resumeToken);
}

async function watch(): Promise<void> {
  let delay = 250;
  let needList = true; // at start, and when the token is too old or from another server
  for (;;) {
    const controller = new AbortController();
    try {
      if (needList) {
        await listAll();
        needList = false;
        renderAll();
      }
      await stream<StreamResponse>(
        "TaskService",
        "StreamTaskStatus",
        { resumeToken: table.resumeToken, checkpointInterval: "2s" },
        (message) => {
          if (connection !== "live") setConnection("live");
          delay = 250;
          table.apply(message);
        },
        controller.signal,
      );
    } catch (err) {
      controller.abort();
      const e = err instanceof TetherError ? err : new TetherError("unknown", String(err));
      if (e.code === "unauthenticated") {
        await askToken(token.get() !== "");
        continue;
      }
      if (e.code === "out_of_range") {
        needList = true; // RESUME_TOKEN_EXPIRED: list again and watch from the fresh token
        continue;
      }
      // The server is down or restarting: keep the token, say so, and try again.
      setConnection("reconnecting", e.reason || e.code);
      await new Promise((r) => setTimeout(r, delay));
      delay = Math.min(delay * 2, 2000);
    }
  }
}

// ------------------------------------------------------------------ the table
function filterOf(): { state: string; task: string; label: [string, string] | null } {
  const label = $<HTMLInputElement>("filter-label").value.trim();
  const [k, ...v] = label.split("=");
  return {
    state: $<HTMLSelectElement>("filter-state").value,
    task: $<HTMLInputElement>("filter-task").value.trim(),
    label: label && k ? [k.trim(), v.join("=").trim()] : null,
  };
}

function matches(t: Task, f: ReturnType<typeof filterOf>): boolean {
  if (f.state && stateOf(t) !== f.state) return false;
  if (f.task && !t.task.includes(f.task)) return false;
  if (f.label && (t.labels ?? {})[f.label[0]] !== f.label[1]) return false;
  return true;
}

function renderCounts(): void {
  const box = $("counts");
  box.replaceChildren();
  for (const [state, n] of table.counts()) {
    const b = el("button", `${state} ${n}`, `count state-${state}`);
    b.dataset.state = state;
    b.addEventListener("click", () => {
      const select = $<HTMLSelectElement>("filter-state");
      select.value = select.value === state ? "" : state;
      renderTable();
    });
    box.append(b);
  }
}

function renderTable(): void {
  const f = filterOf();
  const body = $("task-rows");
  const rows: HTMLElement[] = [];
  const tasks = [...table.tasks.values()].filter((t) => matches(t, f)).reverse().slice(0, 500);
  for (const t of tasks) {
    const tr = el("tr");
    tr.dataset.name = t.name;
    tr.dataset.state = stateOf(t);
    const link = el("a", t.name.slice("tasks/".length, "tasks/".length + 8)) as HTMLAnchorElement;
    link.href = `#/${t.name}`;
    const labels = Object.entries(t.labels ?? {}).map(([k, v]) => `${k}=${v}`).join(" ");
    const cells: (string | HTMLElement)[] = [
      link,
      el("span", stateOf(t), `state state-${stateOf(t)}`),
      t.task,
      t.engineId !== undefined ? String(t.engineId) : "",
      progressBar(t),
      runtime(t),
      labels,
    ];
    for (const c of cells) {
      const td = el("td");
      td.append(c);
      tr.append(td);
    }
    rows.push(tr);
  }
  body.replaceChildren(...rows);
  $("shown").textContent = `${tasks.length} of ${table.tasks.size} tasks`;
}

// ------------------------------------------------------------------ engines, charts
async function refreshCluster(): Promise<void> {
  try {
    const c = await call<{ engines?: Engine[]; registeredTasks?: string[]; degraded?: boolean }>(
      "ClusterService",
      "GetCluster",
      {},
    );
    const rows = (c.engines ?? []).map((e) => {
      const tr = el("tr");
      tr.dataset.state = short(e.state, "ENGINE_STATE_");
      const current = e.currentTask ?? "";
      const cells = [
        String(e.id ?? 0),
        short(e.state, "ENGINE_STATE_"),
        e.host ?? "",
        current ? current.slice("tasks/".length, "tasks/".length + 8) : "",
        String(e.queuedTasks ?? 0),
        String(e.tasksDone ?? 0),
        engineMemory(e.id ?? 0),
        (e.tags ?? []).join(" "),
      ];
      for (const text of cells) tr.append(el("td", text));
      return tr;
    });
    $("engine-rows").replaceChildren(...rows);
    $("degraded").hidden = !c.degraded;
    const select = $<HTMLSelectElement>("submit-task");
    const names = c.registeredTasks ?? [];
    if (select.options.length !== names.length) {
      const chosen = select.value;
      select.replaceChildren(...names.map((n) => new Option(n, n)));
      if (names.includes(chosen)) select.value = chosen;
    }
  } catch (err) {
    if (err instanceof TetherError && err.code === "unauthenticated") return; // watch() asks
  }
}

/** RSS and GPU memory the engine reported after its last task (the runtime's resource report). */
function engineMemory(engineId: number): string {
  let latest: Task | undefined;
  for (const t of table.tasks.values()) {
    if (t.engineId !== engineId || !t.resources || !t.endTime) continue;
    if (!latest || (latest.endTime ?? "") < t.endTime) latest = t;
  }
  const r = latest?.resources;
  if (!r) return "";
  const mib = (b: string | undefined): string => `${(Number(b ?? 0) / 2 ** 20).toFixed(0)} MiB`;
  const gpu = Number(r.gpuAllocatedAfterBytes ?? 0) ? ` · GPU ${mib(r.gpuAllocatedAfterBytes)}` : "";
  return `RSS ${mib(r.rssAfterBytes)}${gpu}`;
}

function renderCharts(): void {
  drawThroughput($<HTMLCanvasElement>("chart-throughput"), table.finishes);
  drawInterruptLatency($<HTMLCanvasElement>("chart-latency"), table.finishes);
}

// ------------------------------------------------------------------ submit
function wireSubmit(): void {
  $("submit-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    void submit();
  });
}

async function submit(): Promise<void> {
  const problem = $("submit-error");
  problem.textContent = "";
  let args: unknown;
  try {
    args = JSON.parse($<HTMLTextAreaElement>("submit-args").value || "{}");
  } catch (err) {
    problem.textContent = `arguments are not JSON: ${String(err)}`;
    return;
  }
  if (typeof args !== "object" || args === null || Array.isArray(args)) {
    problem.textContent = "arguments must be a JSON object, e.g. {\"n\": 10}";
    return;
  }
  const labels: Record<string, string> = {};
  for (const pair of $<HTMLInputElement>("submit-labels").value.split(/[\s,]+/)) {
    if (!pair) continue;
    const [k, ...v] = pair.split("=");
    if (!k || v.length === 0) {
      problem.textContent = `label ${JSON.stringify(pair)} is not key=value`;
      return;
    }
    labels[k] = v.join("=");
  }
  try {
    const answer = await authed(() =>
      call<{ task: Task }>("TaskService", "SubmitTask", {
        task: $<HTMLSelectElement>("submit-task").value,
        args,
        labels,
        requestId: crypto.randomUUID(),
      }),
    );
    location.hash = `#/${answer.task.name}`;
  } catch (err) {
    const e = err as TetherError;
    problem.textContent = `${e.code}${e.reason ? ` (${e.reason})` : ""}: ${e.message}`;
  }
}

// ------------------------------------------------------------------ routing
function route(): void {
  const match = /^#\/(tasks\/[0-9a-zA-Z_-]+)$/.exec(location.hash);
  $("list-view").hidden = match !== null;
  $("task-view").hidden = match === null;
  page = null;
  if (match?.[1]) page = renderTaskPage($("task-view"), match[1], authed);
}

function renderAll(): void {
  renderCounts();
  renderTable();
}

function main(): void {
  const select = $<HTMLSelectElement>("filter-state");
  select.replaceChildren(new Option("any state", ""), ...STATES.map((s) => new Option(s, s)));
  for (const id of ["filter-state", "filter-task", "filter-label"]) {
    $(id).addEventListener("input", renderTable);
    $(id).addEventListener("change", renderTable); // some browsers send only "change" for <select>
  }
  wireAuth();
  wireSubmit();
  window.addEventListener("hashchange", route);
  // Coalesce renders: a burst of events (an llm.generate's tokens) costs one frame.
  let scheduled = false;
  table.listeners.push((event) => {
    page?.onEvent(event);
    if (!scheduled) {
      scheduled = true;
      requestAnimationFrame(() => {
        scheduled = false;
        renderAll();
      });
    }
  });
  route();
  void watch();
  void refreshCluster();
  setInterval(() => void refreshCluster(), 2000);
  setInterval(() => {
    renderCharts();
    if ([...table.tasks.values()].some((t) => !TERMINAL.has(stateOf(t)))) renderTable();
  }, 1000);
  renderCharts();
}

main();
