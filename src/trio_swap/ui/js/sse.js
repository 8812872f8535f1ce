// A Server-Sent Events reader over a fetch() Response, for streams EventSource cannot
// open: the ones that need an Authorization header, and POST (chat completions).

/**
 * Yield `{event, data}` for each event of `response`'s body (`event` defaults to
 * "message"; comments such as heartbeats are skipped). Ends with the body.
 */
export async function* readEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let event = "";
  let data = [];
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let newline;
      while ((newline = buffer.search(/\r\n|\r|\n/)) >= 0) {
        if (newline === buffer.length - 1 && buffer.endsWith("\r")) break; // maybe \r\n
        const line = buffer.slice(0, newline);
        const width = buffer.startsWith("\r\n", newline) ? 2 : 1;
        buffer = buffer.slice(newline + width);
        if (line === "") {
          if (data.length) yield { event: event || "message", data: data.join("\n") };
          event = "";
          data = [];
        } else if (!line.startsWith(":")) {
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          let text = colon < 0 ? "" : line.slice(colon + 1);
          if (text.startsWith(" ")) text = text.slice(1);
          if (field === "event") event = text;
          else if (field === "data") data.push(text);
        }
      }
    }
    if (data.length) yield { event: event || "message", data: data.join("\n") };
  } finally {
    reader.cancel().catch(() => {});
  }
}
