export { boundPort, ListenError, Listeners, listen } from "./Listener.ts"
