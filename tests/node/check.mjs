// The official openai Node SDK against a running gateway: GATE_URL, GATE_KEY.
import OpenAI from "openai";

const client = new OpenAI({ baseURL: process.env.GATE_URL, apiKey: process.env.GATE_KEY, maxRetries: 0 });
const messages = [{ role: "user", content: "Hello from Node" }];

const answer = await client.chat.completions.create({ model: "openai/gpt-4.1", messages });
const chunks = [];
const stream = await client.chat.completions.create({
  model: "openai/gpt-4.1", messages, stream: true, stream_options: { include_usage: true },
});
for await (const chunk of stream) chunks.push(chunk);
const streamed = chunks.filter((c) => c.choices.length).map((c) => c.choices[0].delta.content ?? "").join("");
const embedding = await client.embeddings.create({ model: "openai/text-embedding-3-small", input: "hi" });
const models = await client.models.list();

let notFound = null;
try {
  await client.chat.completions.create({ model: "acme/none", messages });
} catch (error) {
  notFound = error;
}
let unauthorized = null;
try {
  await new OpenAI({ baseURL: process.env.GATE_URL, apiKey: "sk-wrong-key", maxRetries: 0 }).models.list();
} catch (error) {
  unauthorized = error;
}

console.log(JSON.stringify({
  model: answer.model,
  content: answer.choices[0].message.content,
  usage: answer.usage,
  streamed,
  streamUsage: chunks.at(-1).usage,
  embeddingLength: embedding.data[0].embedding.length,
  modelIds: models.data.map((m) => m.id),
  notFound: notFound && { status: notFound.status, cls: notFound.constructor.name, code: notFound.code },
  unauthorized: unauthorized && { status: unauthorized.status, cls: unauthorized.constructor.name },
}));
