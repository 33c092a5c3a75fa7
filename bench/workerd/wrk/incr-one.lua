-- wrk script: POST /obj/<WRK_OBJECT or "obj-0">/incr on a single object.
wrk.method = "POST"
wrk.path = "/obj/" .. (os.getenv("WRK_OBJECT") or "obj-0") .. "/incr"
