// Asks a qaserve server the seed question and prints the best answer as one JSON line:
//   node example.mjs localhost:50051
//   {"answer": "Paris", "start": 54, "end": 59}
import { QAServeClient } from "@qaserve/client";

const [target] = process.argv.slice(2);
if (!target) {
  console.error("usage: node example.mjs HOST:PORT");
  process.exit(2);
}
const client = new QAServeClient(target); // every call has a deadline (10 s unless timeoutMs)
try {
  const { answers } = await client.answer({
    question: "What is the capital of France?",
    context: "France is a country in Western Europe. Its capital is Paris.",
  });
  // start/end count code points, like Python's str; answerText() slices a JavaScript string by the byte offsets.
  const [best] = answers;
  console.log(`{"answer": ${JSON.stringify(best.answer)}, "start": ${best.start}, "end": ${best.end}}`);
} catch (error) {
  console.error(`Answer failed: ${error.codeName} ${error.reason}: ${error.message}`);
  process.exitCode = 1;
} finally {
  client.close();
}
