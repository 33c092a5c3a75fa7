-- wrk script: POST /obj/obj-<i>/incr, i cycling round-robin over 0..WRK_OBJECTS-1
-- (default 1000). Each wrk thread cycles independently from 0.
wrk.method = "POST"
local n = tonumber(os.getenv("WRK_OBJECTS") or "1000")
local i = 0
function request()
  local path = "/obj/obj-" .. i .. "/incr"
  i = (i + 1) % n
  return wrk.format(nil, path)
end
