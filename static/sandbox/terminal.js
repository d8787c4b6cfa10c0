// The lesson terminal: xterm.js on the sandbox's websocket. Mounts on every [data-terminal] element, at load
// and after htmx swaps. The UMD builds of xterm.js and its addons (from Debian's packages) are loaded first
// as classic scripts and found on window.
import * as wire from "./protocol.js";

const ACK_EVERY = 32 * 1024;
const ACK_DELAY_MS = 15;
const INPUT_CHUNK = 32 * 1024;
const RETRY_FIRST_MS = 500;
const RETRY_MAX_MS = 5000;
const STEPS = ["queued", "creating", "starting", "ready"];
const FINAL_STATES = new Set(["ended", "failed", "stopping"]);

const terminals = [];
window.layercakeTerminals = terminals;

const encoder = new TextEncoder();
const latin1 = (text) => Uint8Array.from(text, (c) => c.charCodeAt(0) & 0xff);

class SandboxTerminal {
  constructor(root) {
    this.root = root;
    this.wsPath = root.dataset.wsPath;
    this.panelUrl = root.dataset.panelUrl;
    this.progress = root.querySelector("[data-progress]");
    this.notice = root.querySelector("[data-notice]");
    this.screen = root.querySelector("[data-screen]");
    this.offset = 0; // output bytes written to the screen so far
    this.acked = 0;
    this.ackTimer = null;
    this.hasScreen = false;
    this.replaying = 0;
    this.retryMs = RETRY_FIRST_MS;
    this.finished = false;
    this.state = root.dataset.state;
    this.ws = null;
    this.term = this.createTerminal();
    this.showState(this.state);
    this.connect();
  }

  createTerminal() {
    const term = new window.Terminal({
      allowProposedApi: true,
      cursorBlink: true,
      fontFamily: '"DejaVu Sans Mono", "Menlo", "Consolas", monospace',
      fontSize: 13,
      scrollback: 5000,
      theme: { background: "#1d1f21", foreground: "#e6e6e6", cursor: "#f0c674" },
    });
    this.fit = new window.FitAddon.FitAddon();
    term.loadAddon(this.fit);
    term.loadAddon(new window.WebLinksAddon.WebLinksAddon());
    term.loadAddon(new window.Unicode11Addon.Unicode11Addon());
    term.unicode.activeVersion = "11";
    this.serialize = new window.SerializeAddon.SerializeAddon();
    term.loadAddon(this.serialize);
    term.open(this.screen);
    this.useWebgl(term);
    term.attachCustomKeyEventHandler((event) => this.clipboardKeys(event));
    term.onData((data) => this.sendInput(encoder.encode(data)));
    term.onBinary((data) => this.sendInput(latin1(data)));
    term.onResize(({ cols, rows }) => this.sendNow(wire.resize(cols, rows)));
    this.refit();
    const observer = new ResizeObserver(() => this.scheduleRefit());
    observer.observe(this.screen);
    this.observer = observer;
    return term;
  }

  useWebgl(term) {
    // WebGL renders fastest; without it (or when its context is lost) the DOM renderer takes over.
    try {
      const webgl = new window.WebglAddon.WebglAddon();
      webgl.onContextLoss(() => webgl.dispose());
      term.loadAddon(webgl);
    } catch (error) {
      console.info("terminal: WebGL is unavailable, using the DOM renderer", error);
    }
  }

  clipboardKeys(event) {
    if (event.type !== "keydown") return true;
    const key = event.key.toLowerCase();
    const shortcut = (event.ctrlKey && event.shiftKey) || event.metaKey;
    // Ctrl+Shift+C copies the selection (and must not open the browser's inspector); Ctrl+C alone still
    // interrupts the shell.
    if (shortcut && key === "c" && this.term.hasSelection()) {
      event.preventDefault();
      navigator.clipboard?.writeText(this.term.getSelection());
      return false;
    }
    // Ctrl+Shift+V: the browser's own paste event brings the text, which xterm pastes; the terminal must
    // not also send the key itself.
    if (shortcut && key === "v") return false;
    return true;
  }

  scheduleRefit() {
    clearTimeout(this.refitTimer);
    this.refitTimer = setTimeout(() => this.refit(), 60);
  }

  refit() {
    if (this.screen.offsetParent === null) return;
    try {
      this.fit.fit();
    } catch (error) {
      console.info("terminal: cannot fit yet", error);
    }
  }

  connect() {
    if (this.finished) return;
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(`${scheme}//${location.host}${this.wsPath}`);
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    ws.onopen = () => {
      this.retryMs = RETRY_FIRST_MS;
      ws.send(wire.hello(this.hasScreen, this.offset));
      ws.send(wire.resize(this.term.cols, this.term.rows));
      this.setNotice("");
    };
    ws.onmessage = (event) => this.receive(event.data);
    ws.onclose = (event) => this.closed(event.code);
  }

  receive(buffer) {
    const frame = wire.parse(buffer);
    if (frame === null) return;
    if (frame.kind === wire.STATUS) {
      this.showState(frame.status.state, frame.status.message);
      return;
    }
    if (frame.kind === wire.REPLAY) {
      // A fresh screen from what the server kept. Queries in it (cursor position, device attributes) make
      // the terminal answer; those answers belong to a past program, so they must not reach the shell.
      this.term.reset();
      this.offset = frame.offset;
      this.acked = frame.offset;
      this.replaying += 1;
      this.write(frame.data, () => {
        this.replaying -= 1;
      });
    } else if (frame.offset === this.offset) {
      this.write(frame.data);
    } else if (frame.offset + frame.data.length > this.offset && frame.offset < this.offset) {
      this.write(frame.data.subarray(this.offset - frame.offset));
    }
    this.hasScreen = true;
  }

  write(data, done) {
    const end = this.offset + data.length;
    this.offset = end;
    this.term.write(data, () => {
      done?.();
      this.rendered(end);
    });
  }

  rendered(end) {
    if (end - this.acked >= ACK_EVERY) {
      this.sendAck(end);
    } else if (this.ackTimer === null) {
      this.ackTimer = setTimeout(() => this.sendAck(this.offset), ACK_DELAY_MS);
    }
  }

  sendAck(end) {
    clearTimeout(this.ackTimer);
    this.ackTimer = null;
    if (end > this.acked) {
      this.acked = end;
      this.sendNow(wire.ack(end));
    }
  }

  sendInput(bytes) {
    if (this.replaying > 0) return;
    for (let start = 0; start < bytes.length; start += INPUT_CHUNK) {
      this.sendNow(wire.input(bytes.subarray(start, start + INPUT_CHUNK)));
    }
  }

  sendNow(frame) {
    if (this.ws?.readyState === WebSocket.OPEN) this.ws.send(frame);
  }

  closed(code) {
    this.ws = null;
    if (this.finished) return;
    if (code === wire.CLOSE_ENDED) {
      this.finish();
    } else if (code === wire.CLOSE_FORBIDDEN || code === wire.CLOSE_NOT_FOUND) {
      this.finished = true;
      this.setNotice("This sandbox is not yours, or it no longer exists.");
    } else if (code === wire.CLOSE_ELSEWHERE) {
      this.setNotice("This terminal is open in another tab. ", "Use it here", () => this.connect());
    } else {
      this.setNotice("Connection lost. Reconnecting…");
      setTimeout(() => this.connect(), this.retryMs);
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
    }
    const label = this.progress.querySelector("[data-progress-label]");
    if (label) label.textContent = message || `${state[0].toUpperCase()}${state.slice(1)}…`;
    const ready = state === "ready";
    this.progress.hidden = ready;
    this.root.classList.toggle("is-ready", ready);
    if (ready) {
      this.refit();
      this.term.focus();
    }
  }

  finish() {
    if (this.finished) return;
    this.finished = true;
    this.ws?.close(1000);
    this.observer.disconnect();
    const panel = this.root.closest("[data-panel]");
    const index = terminals.findIndex((entry) => entry.root === this.root);
    if (index >= 0) terminals.splice(index, 1);
    this.term.dispose();
    if (panel && window.htmx) {
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

function mountAll(root) {
  for (const element of root.querySelectorAll("[data-terminal]")) {
    if (element.dataset.mounted) continue;
    element.dataset.mounted = "1";
    const terminal = new SandboxTerminal(element);
    terminals.push({ root: element, term: terminal.term, state: () => terminal.state, terminal });
  }
}

mountAll(document);
document.body.addEventListener("htmx:load", (event) => mountAll(event.target));
