// One task's page: arguments, interrupt record, resources, error and traceback, result,
// and the output streaming in. It starts from GetTask (FULL view) at revision R and then
// applies the shared stream's events for this task above R: a chunk is never shown twice
// or missed, whatever the order in which the page and the stream started.
import { call } from "./api.js";
import { el, progressBar, runtime } from "./dom.js";
import { short, stateOf, TERMINAL } from "./model.js";
const mib = (b) => `${(Number(b ?? 0) / 2 ** 20).toFixed(1)} MiB`;
function field(dl, name, value, id = "") {
    const dd = el("dd");
    if (id)
        dd.id = id;
    dd.append(value);
    dl.append(el("dt", name), dd);
}
function section(title, body, id = "") {
    const box = el("section", "", "panel");
    if (id)
        box.id = id;
    box.append(el("h3", title), body);
    return box;
}
export function renderTaskPage(container, name, authed) {
    let task = null;
    let revision = 0;
    let pending = []; // events that arrived before GetTask answered
    const output = el("pre", "", "output");
    output.id = "task-output";
    const head = el("div");
    const details = el("div");
    const back = el("a", "← all tasks");
    back.href = "#";
    // Built once: redrawing it on every event would wipe the reason being typed.
    const interrupt = interruptForm();
    container.replaceChildren(back, head, interrupt.form, details, section("Output", output));
    const draw = () => {
        if (!task)
            return;
        const state = stateOf(task);
        const title = el("h2");
        const badge = el("span", state, `state state-${state}`);
        badge.id = "task-state";
        title.append(`${task.task} `, badge);
        const bar = progressBar(task);
        bar.id = "task-progress";
        const progressText = el("span", task.progress?.message ?? "");
        progressText.id = "task-progress-message";
        head.replaceChildren(title, bar, progressText);
        if (TERMINAL.has(state))
            interrupt.button.disabled = true;
        const info = el("dl");
        field(info, "name", task.name);
        field(info, "owner", task.owner ?? "");
        field(info, "engine", task.engineId !== undefined ? String(task.engineId) : "");
        field(info, "attempt", String(task.attempt ?? 0));
        if (task.preemptible)
            field(info, "preemptible", "yes");
        field(info, "created", task.createTime ?? "");
        field(info, "runtime", runtime(task));
        field(info, "labels", Object.entries(task.labels ?? {}).map(([k, v]) => `${k}=${v}`).join(" "));
        const parts = [section("Task", info), section("Arguments", el("pre", JSON.stringify(task.args ?? {}, null, 2)))];
        const rec = task.interrupt;
        if (rec) {
            const dl = el("dl");
            field(dl, "requested by", rec.requestedBy ?? "");
            field(dl, "reason", rec.reason ?? "");
            field(dl, "cause", short(rec.cause, "INTERRUPT_CAUSE_"));
            field(dl, "at", rec.requestTime ?? "");
            field(dl, "stage", short(rec.stage, "ESCALATION_STAGE_"));
            field(dl, "final stage", short(rec.finalStage, "ESCALATION_STAGE_"), "task-stage");
            parts.push(section("Interrupt", dl, "task-interrupt"));
        }
        const attempts = task.attempts ?? [];
        if (attempts.length > 1 || attempts.some((a) => a.reason)) {
            // Retried or preempted: one row per attempt, with how it ended and why.
            const table = el("table", "", "attempts");
            const header = el("tr");
            for (const h of ["#", "engine", "started", "ended", "ending", "reason"])
                header.append(el("th", h));
            table.append(header);
            for (const a of attempts) {
                const row = el("tr");
                const reason = [a.reason ?? "", a.endedBy ? `by ${a.endedBy}` : "", a.message ?? ""].filter(Boolean).join(" ");
                for (const cell of [
                    String(a.attempt ?? ""),
                    a.engineId !== undefined ? String(a.engineId) : "",
                    a.startTime ?? "",
                    a.endTime ?? "",
                    a.endTime ? short(a.ending, "ATTEMPT_ENDING_") : "running",
                    reason,
                ])
                    row.append(el("td", cell));
                table.append(row);
            }
            parts.push(section("Attempts", table, "task-attempts"));
        }
        const res = task.resources;
        if (res) {
            const dl = el("dl");
            field(dl, "RSS", `${mib(res.rssBeforeBytes)} → ${mib(res.rssAfterBytes)}`);
            field(dl, "GPU", `${mib(res.gpuAllocatedBeforeBytes)} → ${mib(res.gpuAllocatedAfterBytes)}`);
            field(dl, "children left", String(res.leftoverChildren ?? 0));
            field(dl, "reclaimed", String(res.reclaimed ?? false));
            field(dl, "engine recycled", String(res.engineRecycled ?? false));
            if (res.summary)
                field(dl, "summary", res.summary);
            parts.push(section("Resources", dl));
        }
        if (task.error) {
            const box = el("div");
            box.append(el("p", `${task.error.reason ?? ""}: ${task.error.type ?? ""} ${task.error.message ?? ""}`));
            if (task.error.traceback)
                box.append(el("pre", task.error.traceback, "traceback"));
            parts.push(section("Error", box, "task-error"));
        }
        if (state === "SUCCEEDED")
            parts.push(section("Result", el("pre", JSON.stringify(task.result ?? null, null, 2))));
        details.replaceChildren(...parts);
        output.textContent = task.output ?? "";
    };
    const load = async () => {
        try {
            const answer = await authed(() => call("TaskService", "GetTask", { name }));
            task = answer.task;
            revision = Number(task.revision ?? 0);
            draw();
            const early = pending;
            pending = [];
            for (const event of early)
                apply(event);
        }
        catch (err) {
            const e = err;
            head.replaceChildren(el("p", `${e.code}: ${e.message}`, "error"));
        }
    };
    const apply = (event) => {
        if (!task) {
            pending.push(event);
            return;
        }
        const rev = Number(event.revision ?? 0);
        if (rev <= revision)
            return;
        revision = rev;
        if (event.type === "TASK_EVENT_TYPE_OUTPUT") {
            task.output = (task.output ?? "") + (event.outputChunk ?? "");
            output.textContent = task.output;
            return;
        }
        // A new attempt (retry, preemption) starts its output over; a resumed one replays it.
        const newAttempt = (event.task.attempt ?? 0) !== (task.attempt ?? 0);
        const keepOutput = newAttempt ? "" : (task.output ?? "");
        task = { ...task, ...event.task, output: event.task.output || keepOutput };
        draw();
        // The terminal snapshot is BASIC: fetch the result and traceback once.
        if (TERMINAL.has(stateOf(task)) && event.type === "TASK_EVENT_TYPE_STATE_CHANGED")
            void load();
    };
    function interruptForm() {
        const form = el("form", "", "interrupt");
        const reason = el("input");
        reason.id = "interrupt-reason";
        reason.placeholder = "reason (recorded on the task)";
        const button = el("button", "Interrupt");
        button.id = "interrupt-button";
        button.type = "submit";
        const message = el("span", "", "message");
        message.id = "interrupt-message";
        form.append(reason, button, message);
        form.addEventListener("submit", (ev) => {
            ev.preventDefault();
            button.disabled = true;
            call("TaskService", "InterruptTask", {
                name,
                reason: reason.value,
                requestId: crypto.randomUUID(),
            })
                .then((answer) => {
                message.textContent = `asked: ${stateOf(answer.task)}`;
            })
                .catch((err) => {
                button.disabled = task !== null && TERMINAL.has(stateOf(task));
                message.textContent = `${err.code}${err.reason ? ` (${err.reason})` : ""}: ${err.message}`;
            });
        });
        return { form, button };
    }
    void load();
    return {
        onEvent(event) {
            if (event.task.name === name)
                apply(event);
        },
    };
}
