// The terminal websocket protocol; sandbox/protocol.py is its other half. Every message is a binary frame
// whose first byte says what it is; integers are big-endian.

export const HELLO = 0x01;
export const INPUT = 0x02;
export const RESIZE = 0x03;
export const ACK = 0x04;
export const OUTPUT = 0x81;
export const REPLAY = 0x82;
export const STATUS = 0x83;
export const DEADLINES = 0x84;
export const EVENT = 0x85;

export const FLAG_HAS_SCREEN = 0x01;

export const CLOSE_ENDED = 4000;
export const CLOSE_PROTOCOL = 4400;
export const CLOSE_FORBIDDEN = 4403;
export const CLOSE_NOT_FOUND = 4404;
export const CLOSE_SLOW = 4408;
export const CLOSE_ELSEWHERE = 4409;
export const CLOSE_UNAVAILABLE = 4503;

const decoder = new TextDecoder();

function withKind(kind, size) {
  const frame = new Uint8Array(1 + size);
  frame[0] = kind;
  return frame;
}

export function hello(hasScreen, offset) {
  const frame = withKind(HELLO, 9);
  const view = new DataView(frame.buffer);
  view.setUint8(1, hasScreen ? FLAG_HAS_SCREEN : 0);
  view.setBigUint64(2, BigInt(offset));
  return frame;
}

export function input(bytes) {
  const frame = withKind(INPUT, bytes.length);
  frame.set(bytes, 1);
  return frame;
}

export function resize(cols, rows) {
  const frame = withKind(RESIZE, 4);
  const view = new DataView(frame.buffer);
  view.setUint16(1, cols);
  view.setUint16(3, rows);
  return frame;
}

export function ack(offset) {
  const frame = withKind(ACK, 8);
  new DataView(frame.buffer).setBigUint64(1, BigInt(offset));
  return frame;
}

// Returns {kind, offset, data} for output and replay, {kind, status} for status, {kind, deadlines} for
// deadlines (each {reason, remaining}, remaining in seconds), {kind, event} for an event, or null.
export function parse(buffer) {
  const bytes = new Uint8Array(buffer);
  if (bytes.length === 0) return null;
  const kind = bytes[0];
  if (kind === OUTPUT || kind === REPLAY) {
    if (bytes.length < 9) return null;
    const offset = Number(new DataView(buffer).getBigUint64(1));
    return { kind, offset, data: bytes.subarray(9) };
  }
  if (kind === STATUS) {
    return { kind, status: JSON.parse(decoder.decode(bytes.subarray(1))) };
  }
  if (kind === DEADLINES) {
    return { kind, deadlines: JSON.parse(decoder.decode(bytes.subarray(1))).deadlines };
  }
  if (kind === EVENT) {
    return { kind, event: JSON.parse(decoder.decode(bytes.subarray(1))) };
  }
  return null;
}
