// A reference x402 peer on the TypeScript SDK: @x402/express's paymentMiddleware in front of a tiny OpenAI-compatible
// /v1/chat/completions, paid through @x402/core's in-process x402Facilitator with @x402/evm's exact and upto
// facilitator schemes over FakeChain (no RPC). Started by tests/reference/test_reference_express.py:
//
//   node server.mjs <port>     (prints "listening <port>" once it accepts connections)
//
// Routes (each an OpenAI base URL http://127.0.0.1:<port>/<route>/v1):
//   exact    $0.001 exact (EIP-3009)
//   upto     an upto (Permit2) ceiling of $0.01; the handler settles what the model name says ("settle-1234" ->
//            1234 atomic units) with setSettlementOverrides
//   pending  $0.001 exact to a payee whose transfers never confirm (the library answers settlement_pending)
//   siwx     $0.001 exact declaring sign-in-with-x (a wallet that paid before gets in on the proof alone)
//
// Test-only, unpaid: POST /_peer/fund {address, amount}; GET /_peer/state?payer=0x..; GET /_peer/seen.

import express from "express";
import { paymentMiddleware, setSettlementOverrides, x402ResourceServer } from "@x402/express";
import { x402Facilitator } from "@x402/core/facilitator";
import { ExactEvmScheme as ExactFacilitator } from "@x402/evm/exact/facilitator";
import { ExactEvmScheme as ExactServer } from "@x402/evm/exact/server";
import { UptoEvmScheme as UptoFacilitator } from "@x402/evm/upto/facilitator";
import { UptoEvmScheme as UptoServer } from "@x402/evm/upto/server";
import {
  InMemorySIWxStorage,
  createSIWxResourceServerExtension,
  declareSIWxExtension,
} from "@x402/extensions/sign-in-with-x";
import { FakeChain, NETWORK } from "./fake-chain.mjs";

const port = Number(process.argv[2] ?? process.env.PORT ?? 0);
if (!Number.isInteger(port) || port <= 0) {
  console.error("usage: node server.mjs <port>");
  process.exit(2);
}
const origin = `http://127.0.0.1:${port}`;
const PAYEE = "0x" + "be".repeat(20);
const UNCONFIRMED_PAYEE = "0x" + "de".repeat(20);

const chain = new FakeChain();
chain.unconfirmedPayees.add(UNCONFIRMED_PAYEE.toLowerCase());

const facilitator = new x402Facilitator()
  .register(NETWORK, new ExactFacilitator(chain))
  .register(NETWORK, new UptoFacilitator(chain));
const server = new x402ResourceServer(facilitator)
  .register(NETWORK, new ExactServer())
  .register(NETWORK, new UptoServer())
  .registerExtension(createSIWxResourceServerExtension({ storage: new InMemorySIWxStorage(), origin }));

const exact = (payTo) => ({ scheme: "exact", payTo, price: "$0.001", network: NETWORK });
const routes = {
  "POST /exact/v1/chat/completions": { accepts: exact(PAYEE), description: "exact" },
  "POST /upto/v1/chat/completions": {
    accepts: { scheme: "upto", payTo: PAYEE, price: "$0.01", network: NETWORK },
    description: "upto",
  },
  "POST /pending/v1/chat/completions": { accepts: exact(UNCONFIRMED_PAYEE), description: "pending" },
  "POST /siwx/v1/chat/completions": {
    accepts: exact(PAYEE),
    description: "sign-in-with-x",
    extensions: declareSIWxExtension({ network: NETWORK, statement: "Sign in to the reference peer" }),
  },
};

const seen = [];
const app = express();

// What reached the peer, before the middleware looked at it (and what it answered).
app.use((req, res, next) => {
  const entry = {
    path: req.path,
    paymentSignature: req.get("payment-signature") ?? null,
    signInWithX: req.get("sign-in-with-x") ?? null,
    status: 0,
    paymentResponse: null,
    paymentRequired: null,
  };
  if (!req.path.startsWith("/_peer/")) seen.push(entry);
  res.on("finish", () => {
    entry.status = res.statusCode;
    entry.paymentResponse = res.getHeader("payment-response") ?? null;
    entry.paymentRequired = res.getHeader("payment-required") ?? null;
  });
  next();
});

app.use(express.json());

app.post("/_peer/fund", (req, res) => {
  chain.fund(req.body.address, BigInt(req.body.amount), req.body.approvePermit2 ?? true);
  res.json({ balance: chain.balance(req.body.address).toString() });
});
app.get("/_peer/state", (req, res) => {
  const payer = String(req.query.payer ?? "");
  res.json({ balance: chain.balance(payer).toString(), settlements: chain.settledBy(payer) });
});
app.get("/_peer/seen", (_req, res) => res.json(seen));

app.use(paymentMiddleware(routes, server));

const paths = Object.keys(routes).map((key) => key.split(" ")[1]);
app.post(paths, (req, res) => {
  const model = String(req.body?.model ?? "reference");
  if (model.startsWith("settle-")) setSettlementOverrides(res, { amount: model.slice("settle-".length) });
  res.json({
    id: "chatcmpl-reference",
    object: "chat.completion",
    created: Math.floor(Date.now() / 1000),
    model,
    choices: [{ index: 0, message: { role: "assistant", content: "ok" }, finish_reason: "stop", logprobs: null }],
    usage: { prompt_tokens: 3, completion_tokens: 1, total_tokens: 4 },
  });
});

const listener = app.listen(port, "127.0.0.1", () => console.log(`listening ${port}`));
listener.keepAliveTimeout = 75_000; // longer than client pools keep idle connections: a pooled POST never races a close
const stop = () => listener.close(() => process.exit(0));
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
