// The sandbox panel's notice of an end drawing near: the idle timeout, which input puts off, and the maximum
// age, which nothing does. The server sends the seconds left to each (never a time), so the countdown runs on
// the browser's monotonic clock and the times shown are on the browser's own clock, however far off it is.
const TICK_MS = 1000;
const clock = new Intl.DateTimeFormat([], { hour: "numeric", minute: "2-digit" });
const SENTENCES = {
  // The reaper ends an idle sandbox at its first run from the deadline on, a few seconds after it.
  idle: (at) =>
    `There has been no input for a while, so this sandbox stops at about ${at}. ` +
    "Type anything in the terminal to keep it running.",
  max_age: (at) =>
    `This sandbox reaches its maximum lifetime at ${at} and stops then, whatever you do. ` +
    "Everything in it will be gone.",
};

export class DeadlineNotice {
  // root holds a live region for the sentences, which a screen reader reads once each, and a countdown that
  // it skips (aria-hidden): one announcement a second would drown out the terminal.
  constructor(root) {
    this.root = root;
    this.text = root.querySelector("[data-deadline-text]");
    this.countdown = root.querySelector("[data-deadline-countdown]");
    this.deadlines = [];
    this.said = "";
    this.timer = null;
  }

  // deadlines: [{reason, remaining}], soonest first, as the server sent them; none withdraws the notice.
  show(deadlines) {
    const now = performance.now();
    this.deadlines = deadlines
      .filter(({ reason }) => reason in SENTENCES)
      .map(({ reason, remaining }) => ({ reason, endsAt: now + remaining * 1000 }));
    const sentences = this.deadlines.map(({ reason, endsAt }) =>
      SENTENCES[reason](clock.format(Date.now() + (endsAt - now))),
    );
    // The same news sent again (a reconnect, another tab's input) is not announced again.
    const said = sentences.join(" ");
    if (said !== this.said) {
      this.said = said;
      this.text.replaceChildren(
        ...sentences.map((sentence) => Object.assign(document.createElement("p"), { textContent: sentence })),
      );
    }
    this.root.classList.toggle("is-shown", sentences.length > 0);
    clearInterval(this.timer);
    this.timer = null;
    if (sentences.length > 0) {
      this.tick();
      this.timer = setInterval(() => this.tick(), TICK_MS);
    } else {
      this.countdown.textContent = "";
    }
  }

  tick() {
    const left = Math.max(0, Math.ceil((this.deadlines[0].endsAt - performance.now()) / 1000));
    const minutes = Math.floor(left / 60);
    const seconds = String(left % 60).padStart(2, "0");
    this.countdown.textContent = left > 0 ? `${minutes}:${seconds} left` : "Stopping now";
  }

  clear() {
    this.show([]);
  }
}
