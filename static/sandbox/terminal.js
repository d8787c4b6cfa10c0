// The lesson terminal: xterm.js on the sandbox's websocket. Mounts on every [data-terminal] element, at load
// and after htmx swaps. The UMD builds of xterm.js and its addons (from Debian's packages) are loaded first
// as classic scripts and found on window.
import { DeadlineNotice } from "./deadlines.js";
import * as wire from "./protocol.js";

const ACK_EVERY = 32 * 1024;
const ACK_IDLE_MS = 15;
const INPUT_CHUNK = 32 * 1024;
const REFIT_DELAY_MS = 60;
const RETRY_FIRST_MS = 500;
const RETRY_MAX_MS = 5000;
const STEPS = ["queued", "creating", "starting", "ready"];
const FINAL_STATES = new Set(["stopping", "ended", "failed"]);
const LAST_CLOSES = new Set([wire.CLOSE_ENDED, wire.CLOSE_FORBIDDEN, wire.CLOSE_NOT_FOUND]);
const MODIFIERS = new Set(["Shift", "Control", "Alt", "AltGraph", "Meta"]);
const ABORT = new Uint8Array([0x07]); // Ctrl-G

const terminals = [];
window.layercakeTerminals = terminals;

const encoder = new TextEncoder();
const latin1 = (text) => Uint8Array.from(text, (c) => c.charCodeAt(0) & 0xff);

class SandboxTerminal {
  // takeFocus: the student just started this sandbox, so the terminal is where they are going next.
  constructor(root, { takeFocus }) {
    this.root = root;
    this.takeFocus = takeFocus;
    this.wsPath = root.dataset.wsPath;
    this.panelUrl = root.dataset.panelUrl;
    this.progress = root.querySelector("[data-progress]");
    this.label = root.querySelector("[data-progress-label]");
    this.notice = root.querySelector("[data-notice]");
    this.screen = root.querySelector("[data-screen]");
    this.hint = root.querySelector("[data-hint]");
    this.deadlineNotice = new DeadlineNotice(root.querySelector("[data-deadline]"));
    // The sandbox over its disk budget, as the gateway says (and says once it is within it again).
    this.diskNotice = root.querySelector("[data-disk]");
    root.addEventListener("layercake:disk-full", (event) => this.showDisk(String(event.detail.message || "")));
    root.addEventListener("layercake:disk-freed", () => this.showDisk(""));
    this.state = root.dataset.state;
    this.ws = null;
    this.written = 0; // output bytes handed to xterm: the offset of the next byte
    this.rendered = 0; // output bytes xterm has finished writing
    this.acked = 0;
    this.ackTimer = null;
    this.hasScreen = false;
    this.replaying = 0;
    this.generation = 0; // bumped by each replay, which starts the screen over
    this.retryMs = RETRY_FIRST_MS;
    this.retryTimer = null;
    this.finished = false;
    this.escaped = false; // the last key pressed in the terminal was Escape alone
    this.elsewhere = false; // another tab took the terminal over
    this.term = this.createTerminal();
    this.typeText = (event) => this.typeRequested(event);
    document.addEventListener("layercake:type", this.typeText);
    this.showState(this.state);
    this.connect();
  }

  showDisk(message) {
    const text = message.charAt(0).toUpperCase() + message.slice(1);
    // Said again at each of the gateway's looks: an alert changed to the same words would be read out again.
    if (!this.diskNotice || this.diskNotice.textContent === text) return;
    this.diskNotice.textContent = text;
    this.diskNotice.hidden = text === "";
  }

  createTerminal() {
    const term = new window.Terminal({
      allowProposedApi: true,
      cursorBlink: true,
      fontFamily: '"DejaVu Sans Mono", Menlo, Consolas, "Liberation Mono", monospace',
      fontSize: 14,
      scrollback: 5000,
      theme: { background: "#1d1f21", foreground: "#e6e6e6", cursor: "#f0c674", selectionBackground: "#4c6a85" },
    });
    this.fit = new window.FitAddon.FitAddon();
    term.loadAddon(this.fit);
    term.loadAddon(new window.WebLinksAddon.WebLinksAddon());
    term.loadAddon(new window.Unicode11Addon.Unicode11Addon());
    term.unicode.activeVersion = "11";
    this.serialize = new window.SerializeAddon.SerializeAddon();
    term.loadAddon(this.serialize);
    term.open(this.screen);
    if (this.hint) term.textarea.setAttribute("aria-describedby", this.hint.id);
    term.textarea.addEventListener("focus", () => (this.escaped = false));
    this.webgl = this.loadWebgl(term);
    // xterm takes one such handler; false keeps the key from the shell (and from xterm's own handling).
    term.attachCustomKeyEventHandler((event) => this.tabAfterEscape(event) && this.clipboardKeys(event));
    term.onData((data) => this.sendInput(encoder.encode(data)));
    term.onBinary((data) => this.sendInput(latin1(data)));
    term.onResize(({ cols, rows }) => this.send(wire.resize(cols, rows)));
    this.refit();
    this.observer = new ResizeObserver(() => {
      clearTimeout(this.refitTimer);
      this.refitTimer = setTimeout(() => this.refit(), REFIT_DELAY_MS);
    });
    this.observer.observe(this.screen);
    return term;
  }

  loadWebgl(term) {
    // Without WebGL, or once its context is lost, xterm falls back to its DOM renderer.
    try {
      const webgl = new window.WebglAddon.WebglAddon();
      webgl.onContextLoss(() => {
        webgl.dispose();
        this.webgl = null;
      });
      term.loadAddon(webgl);
      return webgl;
    } catch (error) {
      console.info("terminal: no WebGL, using the DOM renderer", error);
      return null;
    }
  }

  // A keyboard alone can leave the terminal: Escape reaches the shell as ever (vim and readline need it), and
  // a Tab or Shift+Tab pressed right after it is the browser's again and moves focus out, the escape hatch
  // CodeMirror offers. Any other key in between, or coming back into the terminal, makes Tab the shell's again.
  tabAfterEscape(event) {
    if (event.type !== "keydown" || MODIFIERS.has(event.key)) return true;
    const plain = !event.ctrlKey && !event.altKey && !event.metaKey;
    const leaving = this.escaped && event.key === "Tab" && plain;
    this.escaped = event.key === "Escape" && plain && !event.shiftKey;
    if (!leaving) return true;
    // Readline (bash) holds a lone Escape as the start of a Meta key and would spend it on the first key
    // typed on coming back; Ctrl-G after it is readline's abort, which ends that wait and keeps the line.
    this.sendInput(ABORT);
    // false leaves the event alone, so the browser's default, moving focus, happens.
    return false;
  }

  clipboardKeys(event) {
    const key = event.key?.toLowerCase();
    const shortcut = (event.ctrlKey && event.shiftKey) || event.metaKey;
    if (!shortcut || (key !== "c" && key !== "v")) return true;
    // Ctrl+Shift+C copies (and must not open the browser's inspector); Ctrl+C alone still interrupts.
    // Ctrl+Shift+V: the browser's own paste event brings the text, which xterm pastes; the key itself must
    // not reach the shell.
    if (key === "c" && event.type === "keydown") {
      event.preventDefault();
      if (this.term.hasSelection()) navigator.clipboard?.writeText(this.term.getSelection());
    }
    return false;
  }

  refit() {
    if (this.finished || !this.screen.isConnected || this.screen.clientHeight === 0) return;
    try {
      this.fit.fit();
    } catch (error) {
      console.info("terminal: cannot fit yet", error);
    }
  }

  connect() {
    if (this.finished) return;
    this.elsewhere = false;
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(`${scheme}//${location.host}${this.wsPath}`);
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    ws.onopen = () => {
      ws.send(wire.hello(this.hasScreen, this.written));
      ws.send(wire.resize(this.term.cols, this.term.rows));
    };
    ws.onmessage = (event) => {
      this.retryMs = RETRY_FIRST_MS;
      if (!this.notice.hidden) this.setNotice("");
      this.receive(event.data);
    };
    ws.onclose = (event) => {
      if (this.ws === ws) this.closed(event.code);
    };
  }

  receive(buffer) {
    const frame = wire.parse(buffer);
    if (frame === null) return;
    if (frame.kind === wire.STATUS) {
      this.showState(frame.status.state, frame.status.message);
    } else if (frame.kind === wire.DEADLINES) {
      this.deadlineNotice.show(frame.deadlines);
    } else if (frame.kind === wire.EVENT) {
      // What the student did in the sandbox, for the rest of the page: "container.started" is dispatched as
      // layercake:container-started, from the terminal up.
      const name = `layercake:${String(frame.event.type).replace(/[^a-z]+/g, "-")}`;
      this.root.dispatchEvent(new CustomEvent(name, { bubbles: true, detail: frame.event }));
    } else if (frame.kind === wire.REPLAY) {
      // A fresh screen from what the server kept. Queries in it (cursor position, device attributes) make
      // xterm answer; those answers belong to a past program, so they must not reach the shell.
      // The reset goes through write() so that it lands after any output xterm still has queued.
      this.generation += 1;
      this.written = this.rendered = this.acked = frame.offset;
      this.replaying += 1;
      this.term.write("\x1bc");
      this.write(frame.data, () => (this.replaying -= 1));
      this.hasScreen = true;
    } else if (frame.offset > this.written) {
      // Output went missing: start over from a replay rather than show a screen with a hole in it.
      this.hasScreen = false;
      this.ws?.close(1000);
    } else if (frame.offset + frame.data.length > this.written) {
      this.write(frame.data.subarray(this.written - frame.offset));
      this.hasScreen = true;
    }
  }

  write(data, done) {
    const generation = this.generation;
    this.written += data.length;
    const end = this.written;
    this.term.write(data, () => {
      done?.();
      if (this.finished || generation !== this.generation) return;
      this.rendered = Math.max(this.rendered, end);
      this.scheduleAck();
    });
  }

  scheduleAck() {
    if (this.rendered - this.acked >= ACK_EVERY) {
      this.sendAck();
    } else if (this.ackTimer === null) {
      this.ackTimer = setTimeout(() => this.sendAck(), ACK_IDLE_MS);
    }
  }

  sendAck() {
    clearTimeout(this.ackTimer);
    this.ackTimer = null;
    if (this.rendered > this.acked) {
      this.acked = this.rendered;
      this.send(wire.ack(this.acked));
    }
  }

  // A lesson's Run button (static/lessons/lesson.js) asks for a command to be typed here; cancelling the event
  // tells it the terminal took it. Lines end as the Enter key ends them.
  typeRequested(event) {
    if (this.finished || event.defaultPrevented) return;
    const refusal = this.typingRefusal();
    if (refusal) {
      event.detail.refusal = refusal;
      return;
    }
    event.preventDefault();
    this.sendInput(encoder.encode(event.detail.text.replace(/\r?\n/g, "\r")));
    this.term.focus();
  }

  typingRefusal() {
    if (this.state !== "ready") return "The sandbox is still starting: press Run once its prompt shows.";
    if (this.elsewhere) return "The terminal is open in another tab: press \u201cUse it here\u201d first.";
    if (this.ws?.readyState !== WebSocket.OPEN || this.replaying > 0) {
      return "The terminal is reconnecting: press Run again in a moment.";
    }
    return "";
  }

  sendInput(bytes) {
    if (this.replaying > 0) return;
    for (let start = 0; start < bytes.length; start += INPUT_CHUNK) {
      this.send(wire.input(bytes.subarray(start, start + INPUT_CHUNK)));
    }
  }

  send(frame) {
    if (this.ws?.readyState === WebSocket.OPEN) this.ws.send(frame);
  }

  closed(code) {
    this.ws = null;
    if (this.finished) return;
    if (code === wire.CLOSE_ENDED) {
      this.finish();
    } else if (LAST_CLOSES.has(code)) {
      this.stop();
      this.setNotice("This sandbox is not yours, or it no longer exists. Reload the page to start a new one.");
    } else if (code === wire.CLOSE_ELSEWHERE) {
      // The tab with the terminal now is the one told of the sandbox's deadlines, which its input moves.
      this.deadlineNotice.clear();
      this.elsewhere = true;
      this.setNotice("This terminal is open in another tab. ", "Use it here", () => this.connect());
    } else {
      this.setNotice("Connection lost. Reconnecting…");
      this.retryTimer = setTimeout(() => this.connect(), this.retryMs);
      this.retryMs = Math.min(this.retryMs * 2, RETRY_MAX_MS);
    }
  }

  showState(state, message) {
    this.state = state;
    this.root.dataset.state = state;
    if (FINAL_STATES.has(state)) {
      this.finish();
      return;
    }
    const reached = STEPS.indexOf(state);
    for (const item of this.progress.querySelectorAll("[data-step]")) {
      const index = STEPS.indexOf(item.dataset.step);
      item.classList.toggle("done", index < reached);
      item.classList.toggle("current", index === reached);
      if (index === reached) item.setAttribute("aria-current", "step");
      else item.removeAttribute("aria-current");
    }
    this.label.textContent = message || `${state[0].toUpperCase()}${state.slice(1)}…`;
    const ready = state === "ready";
    const becameReady = ready && !this.root.classList.contains("is-ready");
    this.progress.hidden = ready;
    this.root.classList.toggle("is-ready", ready);
    if (becameReady) {
      this.refit();
      if (this.takeFocus && this.focusIsFree()) this.term.focus();
    }
  }

  // Focus went nowhere else while the sandbox launched: it fell to the page when the Start button it was on
  // gave way to the terminal, or it stayed in the panel.
  focusIsFree() {
    const active = document.activeElement;
    return !active || active === document.body || this.root.closest("[data-panel]")?.contains(active);
  }

  // Everything but the page: the socket, timers and xterm. Safe to call more than once.
  stop() {
    this.finished = true;
    document.removeEventListener("layercake:type", this.typeText);
    this.deadlineNotice.clear();
    clearTimeout(this.retryTimer);
    clearTimeout(this.refitTimer);
    clearTimeout(this.ackTimer);
    this.observer.disconnect();
    const ws = this.ws;
    this.ws = null;
    ws?.close(1000);
    const index = terminals.findIndex((entry) => entry.root === this.root);
    if (index >= 0) terminals.splice(index, 1);
    if (!this.term) return;
    // xterm 5.3 throws when it disposes a terminal that still has its WebGL renderer: drop that first.
    this.webgl?.dispose();
    this.webgl = null;
    this.term.dispose();
    this.term = null;
  }

  // The sandbox ended: the panel, fetched afresh, says why and offers a new one.
  finish() {
    if (this.finished) return;
    this.stop();
    const panel = this.root.closest("[data-panel]");
    if (panel?.isConnected && window.htmx) {
      window.htmx.ajax("GET", this.panelUrl, { target: panel, swap: "outerHTML" });
    }
  }

  setNotice(text, action, onAction) {
    this.notice.textContent = text;
    if (action) {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "link-button";
      button.textContent = action;
      button.addEventListener("click", () => {
        this.setNotice("");
        onAction();
      });
      this.notice.append(button);
    }
    this.notice.hidden = !text;
  }
}

const mounted = new WeakMap();

function mountAll(root, { takeFocus }) {
  const elements = [...root.querySelectorAll("[data-terminal]")];
  if (root.matches?.("[data-terminal]")) elements.push(root);
  for (const element of elements) {
    if (mounted.has(element)) continue;
    const terminal = new SandboxTerminal(element, { takeFocus });
    mounted.set(element, terminal);
    if (!terminal.finished) terminals.push({ root: element, term: terminal.term, state: () => terminal.state });
  }
}

// A terminal in the page as it loads (a reload, a sandbox still running from before) leaves focus where the
// page puts it; one that htmx swapped in came from pressing Start.
mountAll(document, { takeFocus: false });
document.addEventListener("htmx:load", (event) => mountAll(event.target, { takeFocus: true }));
document.addEventListener("htmx:beforeCleanupElement", (event) => {
  if (event.target.matches?.("[data-terminal]")) mounted.get(event.target)?.stop();
});
