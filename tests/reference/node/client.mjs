// The TypeScript x402 reference client (@x402/fetch's wrapFetchWithPayment with @x402/evm's client schemes) making
// one paid chat completion: how tests/reference/test_reference_fetch_client.py checks that llm402's sandbox speaks
// the reference wire format.
//
//   X402_CLIENT_KEY=0x<private key> node client.mjs <url> <exact|upto|exact-v1> <model>
//
// Prints one JSON line: {status, body, paymentResponse (decoded), paymentHeaders (how many paid requests left)}.

import { wrapFetchWithPayment, x402Client, decodePaymentResponseHeader } from "@x402/fetch";
import { ExactEvmScheme } from "@x402/evm/exact/client";
import { UptoEvmScheme } from "@x402/evm/upto/client";
import { ExactEvmSchemeV1 } from "@x402/evm/v1";
import { privateKeyToAccount } from "viem/accounts";

const [url, scheme, model] = process.argv.slice(2);
const key = process.env.X402_CLIENT_KEY;
if (!url || !scheme || !model || !key) {
  console.error("usage: X402_CLIENT_KEY=0x.. node client.mjs <url> <exact|upto|exact-v1> <model>");
  process.exit(2);
}
const account = privateKeyToAccount(key);

const client = new x402Client();
if (scheme === "exact") client.register("eip155:*", new ExactEvmScheme(account));
else if (scheme === "upto") client.register("eip155:*", new UptoEvmScheme(account));
else if (scheme === "exact-v1") client.registerV1("base-sepolia", new ExactEvmSchemeV1(account));
else throw new Error(`unknown scheme ${scheme}`);

let paymentHeaders = 0;
const counting = async (input, init) => {
  const headers = new Headers(input instanceof Request ? input.headers : init?.headers);
  if (headers.has("payment-signature") || headers.has("x-payment")) paymentHeaders += 1;
  return fetch(input, init);
};

const pay = wrapFetchWithPayment(counting, client);
const response = await pay(url, {
  method: "POST",
  headers: { "content-type": "application/json" },
  body: JSON.stringify({ model, messages: [{ role: "user", content: "Say hi" }], max_tokens: 64 }),
});
const text = await response.text();
let body = text;
try {
  body = JSON.parse(text);
} catch {
  // not JSON: keep the text
}
const reported = response.headers.get("payment-response") ?? response.headers.get("x-payment-response");
console.log(
  JSON.stringify({
    status: response.status,
    body,
    paymentResponse: reported ? decodePaymentResponseHeader(reported) : null,
    paymentHeaders,
  }),
);
