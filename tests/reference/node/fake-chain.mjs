// An in-memory chain behind @x402/evm's facilitator: the library's FacilitatorEvmSigner interface over a map of
// balances, used EIP-3009 and Permit2 nonces, and fake transaction hashes. No RPC, no network.
//
// It is the chain, not a verifier: it never checks a signature. @x402/evm checks every signature itself (viem's
// hashTypedData + recoverAddress after getCode says the payer has no code); verifyTypedData throws, so a library
// path that leaned on the chain to verify would fail loudly. What a token contract enforces on its own (a used
// nonce, the validity window, the balance, the Permit2 allowance) is enforced here, with revert messages worded
// like the real contracts' so the library maps them to its reasons.
//
// Transfers to a payee in `unconfirmedPayees` move the money but their receipts never come: the receipt wait
// times out, which is how the reference answers `settlement_pending`.

import {
  PERMIT2_ADDRESS,
  eip3009ABI,
  erc20AllowanceAbi,
  x402UptoPermit2ProxyABI,
  x402UptoPermit2ProxyAddress,
} from "@x402/evm";
import {
  decodeFunctionData,
  encodeAbiParameters,
  encodeEventTopics,
  encodeFunctionResult,
  getAddress,
  keccak256,
  toHex,
} from "viem";

export const NETWORK = "eip155:84532"; // Base Sepolia: known to llm402's default policy and the SDK asset tables
export const USDC = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"; // the x402 SDKs' default asset there
const MULTICALL3 = "0xcA11bde05977b3631167028862bE2a173976CA11";
const MAX_UINT256 = 2n ** 256n - 1n;
const TRANSFER_EVENT = [
  {
    type: "event",
    name: "Transfer",
    inputs: [
      { name: "from", type: "address", indexed: true },
      { name: "to", type: "address", indexed: true },
      { name: "value", type: "uint256", indexed: false },
    ],
  },
];
const VIEW_ABI = [...eip3009ABI, ...erc20AllowanceAbi];
const PROXY_ABI = x402UptoPermit2ProxyABI;

const low = (address) => String(address).toLowerCase();
const same = (a, b) => low(a) === low(b);
const now = () => BigInt(Math.floor(Date.now() / 1000));

class Revert extends Error {
  constructor(reason) {
    super(`execution reverted: ${reason}`);
  }
}

export class FakeChain {
  constructor() {
    this.facilitator = getAddress("0x" + "fa".repeat(20));
    this.balances = new Map();
    this.permit2Approved = new Set();
    this.unconfirmedPayees = new Set();
    this.settlements = [];
    this.eip3009Used = new Set();
    this.permit2Used = new Set();
    this.receipts = new Map();
    this.counter = 0;
  }

  // --- test helpers -------------------------------------------------------------------------------------------
  fund(address, amount, approvePermit2 = true) {
    this.balances.set(low(address), this.balance(address) + BigInt(amount));
    if (approvePermit2) this.permit2Approved.add(low(address));
  }

  balance(address) {
    return this.balances.get(low(address)) ?? 0n;
  }

  settledBy(payer) {
    return this.settlements.filter((s) => same(s.payer, payer));
  }

  // --- FacilitatorEvmSigner -----------------------------------------------------------------------------------
  getAddresses() {
    return [this.facilitator];
  }

  async getCode({ address }) {
    const contracts = [USDC, PERMIT2_ADDRESS, x402UptoPermit2ProxyAddress, MULTICALL3];
    return contracts.some((c) => same(c, address)) ? "0x6080604052" : "0x";
  }

  async verifyTypedData() {
    throw new Error("the fake chain verifies no signature: that is the library's job");
  }

  async sendTransaction() {
    throw new Revert("the fake chain deploys no smart wallet");
  }

  async readContract({ address, functionName, args = [] }) {
    if (same(address, MULTICALL3) && functionName === "tryAggregate") {
      const [, calls] = args;
      return calls.map(({ target, callData }) => {
        const abi = same(target, USDC) ? VIEW_ABI : same(target, x402UptoPermit2ProxyAddress) ? PROXY_ABI : null;
        try {
          if (abi === null) throw new Revert(`the fake chain has no contract at ${target}`);
          const { functionName: fn, args: callArgs } = decodeFunctionData({ abi, data: callData });
          const result = this.view(target, fn, callArgs ?? []);
          return { success: true, returnData: encodeFunctionResult({ abi, functionName: fn, result }) };
        } catch {
          return { success: false, returnData: "0x" };
        }
      });
    }
    if (same(address, USDC) && functionName === "transferWithAuthorization") {
      this.checkEip3009(...args.slice(0, 6));
      return undefined;
    }
    if (same(address, x402UptoPermit2ProxyAddress) && functionName === "settle") {
      this.checkPermit2(...args.slice(0, 4));
      return undefined;
    }
    return this.view(address, functionName, args);
  }

  view(address, functionName, args) {
    if (same(address, x402UptoPermit2ProxyAddress) && functionName === "PERMIT2") return PERMIT2_ADDRESS;
    if (!same(address, USDC)) throw new Revert(`the fake chain has no ${functionName} at ${address}`);
    switch (functionName) {
      case "balanceOf":
        return this.balance(args[0]);
      case "allowance":
        return this.permit2Approved.has(low(args[0])) && same(args[1], PERMIT2_ADDRESS) ? MAX_UINT256 : 0n;
      case "name":
        return "USDC";
      case "version":
        return "2";
      case "authorizationState":
        return this.eip3009Used.has(`${low(args[0])}:${low(args[1])}`);
      default:
        throw new Revert(`the fake chain has no ${functionName} at ${address}`);
    }
  }

  async writeContract({ address, functionName, args }) {
    if (same(address, USDC) && functionName === "transferWithAuthorization") {
      const [from, to, value, validAfter, validBefore, nonce] = args;
      this.checkEip3009(from, to, value, validAfter, validBefore, nonce);
      this.eip3009Used.add(`${low(from)}:${low(nonce)}`);
      return this.transfer("exact", from, to, BigInt(value));
    }
    if (same(address, x402UptoPermit2ProxyAddress) && functionName === "settle") {
      const [permit, amount, owner, witness] = args;
      this.checkPermit2(permit, amount, owner, witness);
      this.permit2Used.add(`${low(owner)}:${BigInt(permit.nonce)}`);
      return this.transfer("upto", owner, witness.to, BigInt(amount));
    }
    throw new Revert(`the fake chain has no ${functionName} at ${address}`);
  }

  async waitForTransactionReceipt({ hash }) {
    if (!this.receipts.has(hash)) throw new Error(`transaction ${hash} not found`);
    const receipt = this.receipts.get(hash);
    if (receipt === null) {
      throw new Error(`Timed out while waiting for transaction with hash "${hash}" to be confirmed.`);
    }
    return receipt;
  }

  // --- the token's and Permit2's own rules ----------------------------------------------------------------------
  checkEip3009(from, to, value, validAfter, validBefore, nonce) {
    const t = now();
    if (t <= BigInt(validAfter)) throw new Revert("FiatTokenV2: authorization is not yet valid");
    if (t >= BigInt(validBefore)) throw new Revert("FiatTokenV2: authorization is expired");
    if (this.eip3009Used.has(`${low(from)}:${low(nonce)}`)) {
      throw new Revert("FiatTokenV2: authorization is used or canceled");
    }
    if (this.balance(from) < BigInt(value)) throw new Revert("ERC20: transfer amount exceeds balance");
  }

  checkPermit2(permit, amount, owner, witness) {
    const t = now();
    if (t > BigInt(permit.deadline)) throw new Revert("SignatureExpired");
    if (t < BigInt(witness.validAfter)) throw new Revert("PaymentTooEarly");
    if (!this.getAddresses().some((a) => same(a, witness.facilitator))) throw new Revert("UnauthorizedFacilitator");
    if (BigInt(amount) > BigInt(permit.permitted.amount)) throw new Revert("AmountExceedsPermitted");
    if (this.permit2Used.has(`${low(owner)}:${BigInt(permit.nonce)}`)) throw new Revert("InvalidNonce");
    if (!this.permit2Approved.has(low(owner))) throw new Revert("TRANSFER_FROM_FAILED (no Permit2 allowance)");
    if (this.balance(owner) < BigInt(amount)) throw new Revert("ERC20: transfer amount exceeds balance");
  }

  transfer(scheme, payer, payee, amount) {
    this.balances.set(low(payer), this.balance(payer) - amount);
    this.balances.set(low(payee), this.balance(payee) + amount);
    this.counter += 1;
    const hash = keccak256(toHex(`fake-tx-${this.counter}`));
    const confirmed = !this.unconfirmedPayees.has(low(payee));
    const log = {
      address: USDC,
      topics: encodeEventTopics({ abi: TRANSFER_EVENT, eventName: "Transfer", args: { from: payer, to: payee } }),
      data: encodeAbiParameters([{ type: "uint256" }], [amount]),
      blockNumber: BigInt(this.counter),
      transactionHash: hash,
      logIndex: 0,
      transactionIndex: 0,
      blockHash: keccak256(toHex(`fake-block-${this.counter}`)),
      removed: false,
    };
    this.receipts.set(hash, confirmed ? { status: "success", logs: [log], transactionHash: hash } : null);
    this.settlements.push({ scheme, payer, payee, amount: amount.toString(), transaction: hash, confirmed });
    return hash;
  }
}
