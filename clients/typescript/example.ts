// Run against a live server: cd clients/typescript && npm ci && npx tsx example.ts
import { TetherClient, stateName, taskResult } from "./src/index.js";

const client = new TetherClient(process.env.TETHER_ADDRESS ?? "127.0.0.1:50051");
const { task } = await client.submit("demo.count", { args: { n: 3, interval: 0.1 } });
for await (const item of client.watch({ name: task.name })) {
  if (item.kind === "event") console.log(stateName(item.task.state), item.outputChunk);
}
console.log("result:", taskResult(await client.get(task.name)));
client.close();
